"""The chat page and token budgets: the usage line under the settings follows each answer; over
the budget the refusal stands where the answer would have been, and nothing is stored."""

from playwright.sync_api import expect

from chat.models import Message, Quota
from tests.chat.test_quotas import resets_seen, used_by
from tests.site.conftest import ask, wait_answered


def test_over_the_daily_budget_the_page_shows_why_and_when_it_resets(page, chat_user):
    Quota.objects.create(user=chat_user, tokens_per_day=1)
    page.reload()
    usage = page.locator("#token-usage")
    expect(usage).to_have_text("Today: 0 / 1 tokens · This month: 0 tokens")

    ask(page, "Say hi.", Temperature=0, **{"Max new tokens": 2})
    wait_answered(page)
    used = used_by(chat_user)
    expect(usage).to_have_text(f"Today: {used:,} / 1 tokens · This month: {used:,} tokens")

    page.get_by_label("Message").fill("Say hi again.")
    page.get_by_role("button", name="Send").click()
    notice = page.locator(".turn-notice")
    expect(notice).to_contain_text(f"Your daily token budget is used up: {used:,} of 1 tokens today (UTC).")
    assert any(reset in notice.inner_text() for reset in resets_seen()[0])
    expect(page.locator(".turn-assistant")).to_have_count(1)
    expect(page.get_by_label("Message")).to_have_value("Say hi again.")  # given back, nothing lost
    expect(page.get_by_role("button", name="Send")).to_be_enabled()
    assert Message.objects.filter(conversation__user=chat_user).count() == 2  # the first turn only
    assert not page.script_errors
