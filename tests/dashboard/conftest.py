"""A known history for the usage dashboard: requests on three past UTC days, stored and ended
through chat/lifecycle.py as the tiers do (so the rollup is the one kept as requests end), with
times to the first token chosen here. No other test writes on these days."""

import datetime
import os
import uuid
from dataclasses import dataclass, field

import pytest
from django.contrib.auth import get_user_model

D1, D2, D3 = datetime.date(2025, 1, 6), datetime.date(2025, 1, 7), datetime.date(2025, 1, 8)
D_CONCURRENT = datetime.date(2025, 2, 3)  # test_rollup's concurrent finishes
OWN_DAYS = (D1, D_CONCURRENT + datetime.timedelta(days=1))  # [from, to): cleared before seeding

# day, deployment, user, outcome, prompt tokens, completion tokens, cached tokens, time to the first token (ms)
HISTORY = [
    (D1, "a", "alice", "ok", 10, 20, 0, 100),
    (D1, "a", "alice", "ok", 30, 40, 5, 200),
    (D1, "a", "bob", "ok", 5, 5, 0, 300),
    (D1, "a", "bob", "error", 0, 0, 0, None),  # failed while running, before any token
    (D1, "b", "carol", "ok", 100, 50, 0, 1000),
    (D2, "a", "alice", "ok", 1, 2, 0, 400),
    (D2, "a", "alice", "cancelled", 3, 1, 0, 500),  # Stop pressed after the first token
    (D2, "b", "bob", "cancelled-queued", 0, 0, 0, None),  # the client left before a worker took it
    (D3, "b", "carol", "ok", 7, 8, 0, 2000),
    (D3, "b", "carol", "ok", 9, 10, 0, 4000),
]


@dataclass
class Seed:
    deployments: dict = field(default_factory=dict)  # "a", "b" -> Deployment
    users: dict = field(default_factory=dict)  # "alice", "bob", "carol" -> User
    tokens: dict = field(default_factory=dict)  # "alice", "bob" -> ApiToken (carol uses the chat page)


def end_request(*, day, deployment, user, token, outcome, prompt_tokens, completion_tokens, cached_tokens, ttft_ms, minute=0):
    """One request through the lifecycle, queued at 10:00 + `minute` UTC on `day`."""
    from chat import lifecycle
    from chat.models import RequestLog

    request_id = uuid.uuid4()
    lifecycle.record(
        request_id=request_id, user=user, token=token, deployment=deployment, protocol="predict",
        prompt="hello", system_prompt="", history=[], params={},
    )
    queued_at = datetime.datetime.combine(day, datetime.time(10, minute % 60), datetime.UTC)
    RequestLog.objects.filter(id=request_id).update(queued_at=queued_at)
    if outcome == "cancelled-queued":
        assert lifecycle.cancel_queued(request_id)
        return request_id
    assert lifecycle.start(request_id, worker="")  # no worker's: the orphan sweep leaves a running one alone
    if outcome == "running":
        return request_id
    if outcome == "error":
        assert lifecycle.fail(request_id, "the engine failed")
        return request_id
    first = queued_at + datetime.timedelta(milliseconds=ttft_ms) if ttft_ms is not None else None
    assert lifecycle.finish(
        request_id, response="hi", finish_reason="cancelled" if outcome == "cancelled" else "stop",
        prompt_tokens=prompt_tokens, completion_tokens=completion_tokens, cached_tokens=cached_tokens, first_token_at=first,
    )
    return request_id


def clear_own_days():
    from chat.models import DailyTtft, DailyUsage, RequestLog

    start, end = OWN_DAYS
    RequestLog.objects.filter(queued_at__date__gte=start, queued_at__date__lt=end).delete()
    DailyUsage.objects.filter(day__gte=start, day__lt=end).delete()
    DailyTtft.objects.filter(day__gte=start, day__lt=end).delete()


@pytest.fixture(scope="session")
def seed(django_db_setup, django_db_blocker) -> Seed:
    from chat.models import Deployment
    from chat.tokens import token_create

    run = uuid.uuid4().hex[:6]
    with django_db_blocker.unblock():
        clear_own_days()
        seed = Seed()
        for key in ("a", "b"):
            seed.deployments[key] = Deployment.objects.create(name=f"dash-{key}-{run}", model_source="none", enabled=False)
        for key in ("alice", "bob", "carol"):
            seed.users[key] = get_user_model().objects.create_user(f"{key}-{run}", password=uuid.uuid4().hex)
        for key in ("alice", "bob"):
            seed.tokens[key] = token_create(user=seed.users[key], name=f"{key}'s laptop")[0]
        for minute, (day, deployment, user, outcome, prompt, completion, cached, ttft) in enumerate(HISTORY):
            end_request(
                day=day, deployment=seed.deployments[deployment], user=seed.users[user], token=seed.tokens.get(user),
                outcome=outcome, prompt_tokens=prompt, completion_tokens=completion, cached_tokens=cached, ttft_ms=ttft,
                minute=minute,
            )
    return seed


@pytest.fixture
def staff_client(client):
    """A logged-in superuser in Django's test client."""
    admin = get_user_model().objects.create_superuser(f"admin-{uuid.uuid4().hex[:8]}", "", uuid.uuid4().hex)
    client.force_login(admin, backend="django.contrib.auth.backends.ModelBackend")
    return client


@pytest.fixture(scope="session")
def web(django_db_setup):
    """Daphne alone (the dashboard needs no worker): its base URL."""
    from tests.conftest import start_web

    process, url = start_web()
    yield url
    process.stop()


@pytest.fixture(scope="module")
def browser(web):
    """Chromium for one test module: Playwright's loop in this thread ends with it, so the ORM
    works again in the modules after."""
    from playwright.sync_api import sync_playwright

    from tests.site.conftest import CHROMIUM, CHROMIUM_ARGS

    if not os.path.exists(CHROMIUM):
        pytest.fail(f"{CHROMIUM} is missing: `make install` installs Debian's chromium")
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


@pytest.fixture
def page(browser, web, monkeypatch):
    """A page of a fresh browser context; what it loads and logs is kept on it."""
    from tests.site.conftest import VIEWPORT

    # Playwright's sync API keeps an event loop in this thread (see tests/site/conftest.py); Daphne
    # started before this, so it keeps Django's check.
    monkeypatch.setenv("DJANGO_ALLOW_ASYNC_UNSAFE", "true")
    context = browser.new_context(viewport=VIEWPORT, base_url=web, accept_downloads=True)
    page = context.new_page()
    page.loaded, page.console_errors, page.script_errors = [], [], []
    page.on("request", lambda request: page.loaded.append(request.url))
    page.on("console", lambda message: message.type == "error" and page.console_errors.append(message.text))
    page.on("pageerror", lambda error: page.script_errors.append(str(error)))
    yield page
    context.close()
