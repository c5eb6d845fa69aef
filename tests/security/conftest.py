"""Helpers of the security and bad-input tests: a logged-in `requests` session (as a browser does
it: the login form with its CSRF token), and a copy of the default deployment capped at a few tokens."""

import uuid

import pytest
import requests

from chat.models import Deployment


def login(base_url: str, username: str, password: str, session: requests.Session | None = None, path: str = "/accounts/login/") -> requests.Response:
    """The login form, filled in as a browser does (with the CSRF token from the form's page)."""
    session = session or requests.Session()
    session.get(f"{base_url}{path}", timeout=30)
    data = {"username": username, "password": password, "csrfmiddlewaretoken": session.cookies["csrftoken"]}
    return session.post(f"{base_url}{path}", data=data, allow_redirects=False, timeout=30)


def site_session(base_url: str, username: str, password: str) -> requests.Session:
    """A session logged in through the login form."""
    session = requests.Session()
    response = login(base_url, username, password, session)
    assert response.status_code == 302, response.text
    return session


def csrf(session: requests.Session) -> dict:
    return {"csrfmiddlewaretoken": session.cookies["csrftoken"]}


@pytest.fixture
def site_user(db_user_factory):
    """(user, password) of a fresh user who can log in to the site."""
    password = "pw-" + uuid.uuid4().hex
    user = db_user_factory()
    user.set_password(password)
    user.save()
    return user, password


@pytest.fixture
def capped(stack):
    """A copy of the default deployment (same worker queue) whose context leaves room for one new
    token after a prompt of "Hi there": valid requests cost little, longer ones are refused as too long."""
    from chat.generation import Conversation
    from chat.prompting import count_tokens, edge_tokenizer, render_prompt

    deployment = Deployment.objects.get(name="default")
    tokenizer = edge_tokenizer(deployment.tokenizer_files)
    short = count_tokens(tokenizer, render_prompt(tokenizer, Conversation(prompt="Hi there").messages(), deployment.chat_template))
    deployment.pk, deployment.name = None, f"capped-{uuid.uuid4().hex[:8]}"
    deployment.context_length, deployment.default_max_new_tokens, deployment.queue = short + 1, 1, "default"
    deployment.save()
    return deployment
