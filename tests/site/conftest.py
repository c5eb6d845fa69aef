"""The chat site in a real browser: Playwright driving Debian's chromium against the suite's Daphne.

`make install` puts chromium at /usr/bin/chromium; Playwright never downloads a browser here.
"""

import os
import uuid

import pytest
from playwright.sync_api import expect, sync_playwright

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
VIEWPORT = {"width": 1280, "height": 800}
# Generation on a busy 2-core machine can be slow; these bound waits, they assert no speed.
ANSWER_TIMEOUT_MS = 240_000

expect.set_options(timeout=30_000)


@pytest.fixture(scope="package")
def browser(stack):
    if not os.path.exists(CHROMIUM):
        pytest.fail(f"{CHROMIUM} is missing: `make install` installs Debian's chromium")
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


@pytest.fixture(autouse=True)
def _orm_beside_playwright(stack, monkeypatch):
    # Playwright's sync API keeps an event loop in this thread, which makes Django refuse ORM calls
    # as "async"; these tests are plain sync code. Set only after the stack's processes started,
    # so the worker and Daphne keep Django's check.
    monkeypatch.setenv("DJANGO_ALLOW_ASYNC_UNSAFE", "true")


@pytest.fixture
def new_context(browser, stack):
    contexts = []

    def make():
        context = browser.new_context(viewport=VIEWPORT, base_url=stack.url)
        contexts.append(context)
        return context

    yield make
    for context in contexts:
        context.close()


@pytest.fixture
def page(new_context):
    page = new_context().new_page()
    page.script_errors = []
    page.on("pageerror", lambda error: page.script_errors.append(str(error)))
    return page


def make_user(**extra):
    """A user with a known password: (user, password)."""
    from django.contrib.auth import get_user_model

    password = "pw-" + uuid.uuid4().hex
    user = get_user_model().objects.create_user(f"site-{uuid.uuid4().hex[:10]}", password=password, **extra)
    return user, password


def log_in(page, user, password, next_path="/"):
    page.goto(next_path)
    page.get_by_label("Username").fill(user.username)
    page.get_by_label("Password").fill(password)
    page.get_by_role("button", name="Log in").click()
    page.wait_for_load_state()


@pytest.fixture
def chat_user(page):
    """A fresh user, logged in on `page`, which shows the chat page."""
    user, password = make_user()
    log_in(page, user, password)
    expect(page.get_by_label("Message")).to_be_visible()
    return user


def ask(page, text, **settings):
    """Fill the sampling controls given (label -> value), type `text`, press Send."""
    for label, value in settings.items():
        page.get_by_label(label, exact=True).fill(str(value))
    answers = page.locator(".turn-assistant")
    before = answers.count()
    page.get_by_label("Message").fill(text)
    page.get_by_role("button", name="Send").click()
    expect(answers).to_have_count(before + 1, timeout=ANSWER_TIMEOUT_MS)  # the server took it


def last_answer(page):
    return page.locator('[data-role="assistant"]').last


def wait_answered(page, status="ok"):
    """Wait until the last answer has ended; return its text."""
    turn = page.locator(".turn-assistant").last
    expect(turn).to_have_attribute("data-status", status, timeout=ANSWER_TIMEOUT_MS)
    return last_answer(page).inner_text()


def create_conversation(user, title, turns=(), **fields):
    """A stored conversation with (question, answer) turns, made directly in the database."""
    from chat.models import Conversation, Deployment, Message

    conversation = Conversation.objects.create(
        user=user, title=title, deployment=Deployment.objects.get(name="default"), **fields
    )
    for question, answer in turns:
        Message.objects.create(conversation=conversation, role=Message.Role.USER, content=question)
        Message.objects.create(conversation=conversation, role=Message.Role.ASSISTANT, content=answer)
    return conversation


# The last answer shows its first words (not "Waiting: N ahead of you", which a busy worker shows first).
ANSWER_BEGUN = """() => {
  const turns = document.querySelectorAll(".turn-assistant");
  const article = turns.length ? turns[turns.length - 1].querySelector("article") : null;
  return article !== null && !article.querySelector(".waiting") && article.textContent.trim().length > 0;
}"""


def wait_answer_begun(page) -> None:
    """Until the last answer's first words show (its place in line does not count)."""
    page.wait_for_function(ANSWER_BEGUN, timeout=ANSWER_TIMEOUT_MS)
