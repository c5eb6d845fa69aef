"""Logging in and out (Django auth): anonymous visitors are sent to the login page."""

from playwright.sync_api import expect

from tests.site.conftest import log_in, make_user


def test_anonymous_visitor_logs_in_lands_on_the_chat_page_and_logs_out(page):
    user, password = make_user()
    page.goto("/")
    assert "/accounts/login/" in page.url

    page.get_by_label("Username").fill(user.username)
    page.get_by_label("Password").fill("wrong")
    page.get_by_role("button", name="Log in").click()
    expect(page.get_by_role("alert")).to_contain_text("didn't match")

    log_in(page, user, password)
    expect(page.get_by_label("Message")).to_be_visible()
    expect(page.get_by_role("button", name="Send")).to_be_enabled()
    expect(page.get_by_role("button", name="Stop")).to_be_disabled()
    expect(page.get_by_text(user.username)).to_be_visible()

    page.get_by_role("button", name="Log out").click()
    expect(page.get_by_role("heading", name="Log in")).to_be_visible()
    page.goto("/conversations/")
    assert "/accounts/login/" in page.url
