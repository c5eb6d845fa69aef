"""The conversation list: newest first, search, rename, delete; nobody sees another's (acceptance 6)."""

from datetime import timedelta

from django.utils import timezone
from playwright.sync_api import expect

from chat.models import Conversation, Message
from tests.site.conftest import create_conversation, log_in, make_user


def titled(prefix):
    return [f"{prefix} {word}" for word in ("apples", "bananas", "cherries")]


def test_list_is_newest_first_and_searchable(page, chat_user):
    now = timezone.now()
    for age, title in enumerate(titled("Fruit")):  # apples is the newest
        conversation = create_conversation(chat_user, title, [("q", "a")])
        Conversation.objects.filter(pk=conversation.pk).update(updated_at=now - timedelta(minutes=age))

    page.goto("/conversations/")
    expect(page.locator(".conversation-link")).to_have_text(titled("Fruit"))
    page.get_by_label("Search conversations").fill("BAN")
    page.get_by_role("button", name="Search").click()
    expect(page.locator(".conversation-link")).to_have_text(["Fruit bananas"])
    page.get_by_label("Search conversations").fill("kiwi")
    page.get_by_role("button", name="Search").click()
    expect(page.locator(".conversation-link")).to_have_count(0)
    expect(page.get_by_text("No conversation's title contains “kiwi”.")).to_be_visible()

    # The chat page's sidebar lists them the same way, and opens one.
    page.goto("/")
    recent = page.get_by_role("navigation", name="Recent conversations")
    expect(recent.get_by_role("link").filter(has_text="Fruit")).to_have_text(titled("Fruit"))
    recent.get_by_role("link", name="Fruit cherries").click()
    expect(page.locator("#conversation-title")).to_have_text("Fruit cherries")


def test_rename_and_delete(page, chat_user):
    keep = create_conversation(chat_user, "Keep me", [("q1", "a1")])
    doomed = create_conversation(chat_user, "Delete me", [("q2", "a2")])
    page.goto("/conversations/")

    page.get_by_label("New title for Keep me").fill("  Kept,   renamed ")
    page.locator("li", has=page.get_by_label("New title for Keep me")).get_by_role("button", name="Rename").click()
    expect(page.get_by_role("status")).to_contain_text("Renamed to “Kept, renamed”.")
    expect(page.get_by_role("link", name="Kept, renamed")).to_be_visible()
    keep.refresh_from_db()
    assert keep.title == "Kept, renamed"

    page.get_by_label("New title for Kept, renamed").fill("   ")  # refused, nothing changes
    page.locator("li", has=page.get_by_label("New title for Kept, renamed")).get_by_role("button", name="Rename").click()
    keep.refresh_from_db()
    assert keep.title == "Kept, renamed"

    page.once("dialog", lambda dialog: dialog.dismiss())  # "Cancel" keeps it
    row = page.locator("li", has=page.get_by_role("link", name="Delete me"))
    row.get_by_role("button", name="Delete").click()
    assert Conversation.objects.filter(pk=doomed.pk).exists()
    page.once("dialog", lambda dialog: dialog.accept())
    row.get_by_role("button", name="Delete").click()
    expect(page.get_by_role("status")).to_contain_text("Deleted “Delete me”.")
    expect(page.get_by_role("link", name="Delete me")).to_have_count(0)
    assert not Conversation.objects.filter(pk=doomed.pk).exists()
    assert not Message.objects.filter(conversation_id=doomed.pk).exists()
    assert Message.objects.filter(conversation=keep).count() == 2


def test_a_second_user_sees_none_of_the_first_users_conversations(page, new_context, chat_user):
    mine = create_conversation(chat_user, "Secret plans", [("the plan", "is secret")])
    other, password = make_user()
    intruder = new_context().new_page()
    log_in(intruder, other, password)

    expect(intruder.get_by_role("navigation", name="Recent conversations")).not_to_contain_text("Secret plans")
    intruder.goto("/conversations/")
    expect(intruder.locator("main")).not_to_contain_text("Secret plans")
    intruder.goto("/conversations/?q=Secret")
    expect(intruder.locator(".conversation-link")).to_have_count(0)

    response = intruder.goto(f"/c/{mine.pk}/")
    assert response.status == 404
    expect(intruder.locator("body")).not_to_contain_text("the plan")
    for action in ("rename", "delete"):
        status = intruder.evaluate(
            """async ([url, token]) => (await fetch(url, {method: "POST", headers: {"X-CSRFToken": token},
                 body: new URLSearchParams({title: "mine now"})})).status""",
            [f"/c/{mine.pk}/{action}", _csrf(intruder)],
        )
        assert status == 404
    mine.refresh_from_db()
    assert mine.title == "Secret plans"

    # Sending into someone else's conversation over the socket is refused and stores nothing.
    intruder.goto("/")
    intruder.evaluate(
        """(id) => new Promise((resolve) => {
             const socket = new WebSocket(`ws://${location.host}/ws/chat/`);
             socket.onopen = () => socket.send(JSON.stringify({type: "send", conversation: id, deployment: "default", prompt: "hi"}));
             socket.onmessage = (event) => { window.reply = JSON.parse(event.data); resolve(); };
           })""",
        str(mine.pk),
    )
    assert intruder.evaluate("window.reply") == {"type": "error", "message": "No such conversation.", "param": "conversation"}
    assert mine.messages.count() == 2

    # The owner still has it all.
    page.goto(f"/c/{mine.pk}/")
    expect(page.locator('[data-role="assistant"]')).to_have_text("is secret")


def _csrf(page):
    return next(c["value"] for c in page.context.cookies() if c["name"] == "csrftoken")
