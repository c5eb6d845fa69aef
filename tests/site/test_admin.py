"""The admin for operators: tokens shown once and revoked (acceptance 5), the worker check, usage."""

import re

import requests
from playwright.sync_api import expect

from chat.models import ApiToken, RequestLog
from tests.site.conftest import log_in, make_user


def admin_page(page):
    admin, password = make_user(is_staff=True, is_superuser=True)
    log_in(page, admin, password, next_path="/admin/")
    expect(page.get_by_role("heading", name="Site administration")).to_be_visible()
    return admin


def predict(stack, token):
    return requests.post(
        stack.predict_url(), headers={"Authorization": token}, json={"prompt": "Hi", "max_new_tokens": 1}, timeout=300
    )


def test_token_made_in_the_admin_is_shown_once_works_and_stops_working_when_revoked(page, stack):
    admin_page(page)
    owner, _ = make_user()
    page.goto("/admin/chat/apitoken/add/")
    page.get_by_label("User:").select_option(label=owner.username)
    page.get_by_label("Name:").fill("laptop")
    page.get_by_role("button", name="Save", exact=True).click()

    shown = page.locator(".messagelist").inner_text()
    raw = re.search(r"shown only this once\): (\S+)", shown).group(1)
    token = ApiToken.objects.get(user=owner)
    assert raw.startswith(token.prefix) and raw not in token.digest

    response = predict(stack, raw)
    assert response.status_code == 200, response.text
    assert RequestLog.objects.filter(token=token).count() == 1

    page.goto(f"/admin/chat/apitoken/{token.pk}/change/")  # never shown again
    assert raw not in page.content()
    page.goto("/admin/chat/apitoken/")
    page.locator("tr", has_text=owner.username).get_by_role("checkbox").check()
    page.get_by_label("Action:").select_option(label="Revoke the selected tokens")
    page.get_by_role("button", name="Go").click()
    expect(page.locator(".messagelist")).to_contain_text("Revoked 1 token(s).")

    response = predict(stack, raw)
    assert response.status_code == 401
    assert response.json()["error"]["message"] == "Invalid or revoked API token."


def test_deployment_check_action_reports_that_the_worker_answered(page, stack):
    admin = admin_page(page)
    page.goto("/admin/chat/deployment/")
    page.get_by_role("checkbox", name="Select this object for an action - default", exact=True).check()
    page.get_by_label("Action:").select_option(label="Check that the worker answers")
    page.get_by_role("button", name="Go").click()
    expect(page.locator(".messagelist .success")).to_contain_text("Deployment 'default': the worker answered", timeout=120_000)
    check = RequestLog.objects.get(user=admin, protocol="check")
    assert check.status == RequestLog.Status.OK and check.worker


def test_stored_requests_filter_by_user_with_usage_totals(page, stack, user, token):
    admin_page(page)
    for prompt in ("one", "two"):
        requests.post(stack.predict_url(), headers={"Authorization": token}, json={"prompt": prompt, "max_new_tokens": 2}, timeout=300)
    rows = RequestLog.objects.filter(user=user)
    prompt_tokens = sum(r.prompt_tokens for r in rows)
    completion_tokens = sum(r.completion_tokens for r in rows)
    cached_tokens = sum(r.cached_tokens for r in rows)  # None (not stored) would fail the sum
    assert rows.count() == 2 and prompt_tokens > 0 and cached_tokens < prompt_tokens

    page.goto(f"/admin/chat/requestlog/?user__id__exact={user.pk}&status__exact=ok")
    expect(page.locator("h1")).to_have_text(
        f"Stored requests — 2 requests, {prompt_tokens} prompt tokens ({cached_tokens} of them cached) "
        f"and {completion_tokens} completion tokens"
    )
    expect(page.locator("#result_list tbody tr")).to_have_count(2)
    page.goto(f"/admin/chat/requestlog/?user__id__exact={user.pk}&status__exact=error")
    expect(page.locator("h1")).to_have_text("Stored requests — 0 requests, 0 prompt tokens (0 of them cached) and 0 completion tokens")
