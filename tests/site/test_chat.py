"""The chat page against the real worker: streaming, reload, Stop, Regenerate (acceptance 1 and 2)."""

import re
import time

from playwright.sync_api import expect

from chat.models import Conversation, Message, RequestLog
from tests.site.conftest import ask, last_answer, wait_answer_begun, wait_answered

RECORD_LENGTHS = """() => {
  window.answerLengths = [];
  const record = () => {
    const answers = document.querySelectorAll('[data-role="assistant"]');
    if (answers.length) window.answerLengths.push(answers[answers.length - 1].textContent.length);
  };
  new MutationObserver(record).observe(document.getElementById("messages"), {subtree: true, childList: true, characterData: true});
}"""


def words(text: str) -> list[str]:
    return re.findall(r"\w+", text)


def conversation_of(page) -> Conversation:
    conversation_id = page.url.rstrip("/").rsplit("/", 1)[-1]
    return Conversation.objects.get(pk=conversation_id)


def test_answer_streams_in_and_is_still_there_after_a_reload(page, chat_user):
    page.evaluate(RECORD_LENGTHS)
    ask(page, "What is the capital of France?", Temperature=0)
    text = wait_answered(page)

    lengths = page.evaluate("window.answerLengths")
    assert len({n for n in lengths if n > 0}) >= 3, f"the answer did not grow in steps: {lengths}"
    assert "Paris" in text
    assert "/c/" in page.url  # the new conversation got its own address

    page.reload()
    expect(page.locator('[data-role="user"]')).to_have_text(["What is the capital of France?"])
    expect(last_answer(page)).to_contain_text("Paris")
    expect(page.get_by_label("Temperature")).to_have_value("0")

    conversation = conversation_of(page)
    assert conversation.user == chat_user
    answer = conversation.messages.get(role=Message.Role.ASSISTANT)
    assert answer.status == Message.Status.OK and "Paris" in answer.content
    assert answer.request.status == RequestLog.Status.OK
    assert answer.request.protocol == "browser" and answer.request.params["temperature"] == 0
    assert not page.script_errors


def test_stop_ends_the_answer_on_the_worker_and_keeps_what_was_written(page, chat_user):
    ask(page, "Write a very long story about a dragon who learns to bake bread.", **{"Max new tokens": 400})
    stop = page.get_by_role("button", name="Stop")
    wait_answer_begun(page)  # the first words (not its place in line)
    expect(stop).to_be_enabled()
    stop.click()

    # The text stops growing within 2 seconds of Stop and stays as it is.
    time.sleep(2)
    stopped_at = len(last_answer(page).inner_text())
    wait_answered(page, status="cancelled")
    time.sleep(2)
    shown = last_answer(page).inner_text()
    assert len(shown) == stopped_at
    expect(stop).to_be_disabled()
    expect(page.get_by_text("Stopped before the end.")).to_be_visible()

    answer = conversation_of(page).messages.get(role=Message.Role.ASSISTANT)
    assert answer.status == Message.Status.CANCELLED
    assert answer.content and words(answer.content) == words(shown)  # stored as it was shown
    request = answer.request
    assert request.status == RequestLog.Status.CANCELLED and request.finish_reason == "cancelled"
    assert request.completion_tokens < 400  # the worker stopped, not only the page

    # The worker is free: the next question is answered, in the same conversation.
    ask(page, "What is 2 + 2?", **{"Max new tokens": 16})
    wait_answered(page)
    assert conversation_of(page).messages.filter(status=Message.Status.OK, role="assistant").count() == 1

    page.reload()
    expect(page.get_by_text("Stopped before the end.")).to_be_visible()
    assert page.locator('[data-role="assistant"]').first.inner_text() == shown


def test_regenerate_answers_the_last_question_again(page, chat_user):
    ask(page, "Name a colour.", Temperature=0, **{"Max new tokens": 6})
    first = wait_answered(page)
    conversation = conversation_of(page)
    old = conversation.messages.get(role=Message.Role.ASSISTANT)

    page.get_by_role("button", name="Regenerate").click()
    again = wait_answered(page)

    assert again == first  # greedy: the same question gives the same answer
    messages = list(conversation.messages.all())
    assert [m.role for m in messages] == ["user", "assistant"]
    assert messages[1].pk != old.pk and messages[1].request_id != old.request_id
    assert RequestLog.objects.get(pk=messages[1].request_id).prompt == "Name a colour."
    expect(page.locator('[data-role="assistant"]')).to_have_count(1)


def test_the_model_gets_the_stored_history_and_the_system_prompt(page, chat_user):
    page.get_by_label("System prompt").fill("You are terse.")
    ask(page, "My name is Ada.", **{"Max new tokens": 8})
    first = wait_answered(page)
    ask(page, "What is my name?", **{"Max new tokens": 8})
    wait_answered(page)

    conversation = conversation_of(page)
    second = conversation.messages.filter(role="assistant").last().request
    assert second.history == [["My name is Ada.", conversation.messages.filter(role="assistant").first().content]]
    assert first.strip() and second.system_prompt == "You are terse."
    page.reload()
    expect(page.get_by_label("System prompt")).to_have_value("You are terse.")
    expect(page.locator('[data-role="user"]')).to_have_count(2)
