"""Reloading the chat page mid-answer (issue 22): the answer so far is shown at once and keeps
streaming to its end, on the same web process or on a second one."""

import re

import pytest

from chat.models import Message
from tests.conftest import start_web
from tests.site.conftest import ask, last_answer, wait_answer_begun, wait_answered

LONG = "Write a very long story about a dragon who learns to bake bread."


# Installed in the reloaded page: the last answer's status as the server rendered it, and its
# text length at each change.
WATCH_LOAD = """document.addEventListener("DOMContentLoaded", () => {
  const last = () => { const a = document.querySelectorAll(".turn-assistant"); return a[a.length - 1]; };
  window.statusAtLoad = last() ? last().dataset.status : null;
  window.answerLengths = [];
  new MutationObserver(() => window.answerLengths.push(last().querySelector("article").textContent.length))
    .observe(document.getElementById("messages"), {subtree: true, childList: true, characterData: true});
});"""


def words(text: str) -> list[str]:
    return re.findall(r"\w+", text)


@pytest.fixture
def second_web():
    web, url = start_web()
    yield url
    web.stop()


def reload_mid_answer(page, chat_user, go_back):
    ask(page, LONG, Temperature=0, **{"Max new tokens": 300})
    wait_answer_begun(page)  # its first words, not its place in line
    before = words(last_answer(page).inner_text())
    assert page.locator(".turn-assistant").last.get_attribute("data-status") == "streaming"
    page.add_init_script(WATCH_LOAD)
    go_back(page)

    text = wait_answered(page)
    after = words(text)
    assert after[: len(before) - 1] == before[:-1]  # what was visible before (its last word may have been cut)
    assert page.evaluate("window.statusAtLoad") == "streaming"  # the reload came mid-answer
    lengths = [n for n in page.evaluate("window.answerLengths") if n > 0]
    assert len(set(lengths)) >= 2 and max(lengths) > lengths[0], lengths  # it kept growing after the reload
    stored = Message.objects.get(pk=page.locator(".turn-assistant").last.get_attribute("data-message-id"))
    assert stored.status == Message.Status.OK and after == words(stored.content)
    assert stored.request.response == stored.content
    assert not page.script_errors


def test_reloading_mid_answer_shows_it_and_streams_the_rest(page, chat_user):
    reload_mid_answer(page, chat_user, lambda p: p.reload())


def test_the_reloaded_page_from_a_second_web_process_streams_the_rest(page, chat_user, second_web):
    def elsewhere(p):
        path = p.url.split("://", 1)[1].split("/", 1)[1]
        p.goto(f"{second_web}/{path}")

    reload_mid_answer(page, chat_user, elsewhere)
