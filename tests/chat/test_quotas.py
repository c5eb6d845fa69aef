"""Token budgets per UTC day and month (chat/quotas.py): 429 with the reset time on every API once
the stored usage reaches the budget; other users unaffected; a running request finishes; the count
is read from PostgreSQL, so a fresh web process (and a rollup rebuilt from the rows) agrees."""

import datetime
import json
import re
import struct
import uuid

import pytest
import requests
import websocket
from django.contrib.auth.models import Group
from django.core.management import call_command
from openai import OpenAI, RateLimitError

from chat import quotas
from chat.models import Quota, RequestLog
from chat.tokens import token_create
from llmsite.errors import QuotaExceeded
from tests.chat import clients
from tests.conftest import start_web

EOS = "<EOS>"
ASK = {"prompt": "Say hi.", "max_new_tokens": 2, "temperature": 0}


def used_by(user) -> int:
    """Prompt plus answer tokens of the user's ended requests, summed from the rows themselves."""
    rows = RequestLog.objects.filter(user=user, status__in=["ok", "error", "cancelled"])
    return sum((row.prompt_tokens or 0) + (row.completion_tokens or 0) for row in rows)


def resets_seen() -> tuple[set, set]:
    """The texts of the next UTC midnight and the next 1st (both sides of a boundary crossed meanwhile)."""
    now = datetime.datetime.now(datetime.UTC)
    days, months = set(), set()
    for moment in (now - datetime.timedelta(minutes=5), now + datetime.timedelta(minutes=5)):
        day, month = quotas.resets(moment)
        days.add(f"{day:%Y-%m-%d} 00:00 UTC")
        months.add(f"{month:%Y-%m-%d} 00:00 UTC")
    return days, months


def predict(url: str, raw: str, body=ASK) -> requests.Response:
    return requests.post(url, headers={"Authorization": raw}, json=body, timeout=300)


def ws_refusal(url: str, raw: str) -> tuple[dict, int]:
    """Send one message on the predict WebSocket: the error it gets and the close code after it."""
    ws = websocket.create_connection(url, header=[f"Authorization: {raw}"], timeout=60)
    try:
        ws.send(json.dumps(ASK))
        body = clients.receive_json(ws)
        opcode, frame = ws.recv_data(control_frame=True)
    finally:
        ws.close()
    assert opcode == websocket.ABNF.OPCODE_CLOSE
    return body["error"], struct.unpack("!H", frame[:2])[0]


def assert_daily_refusal(message: str, used: int, limit: int) -> None:
    assert f"Your daily token budget is used up: {used:,} of {limit:,} tokens today (UTC)." in message
    assert any(reset in message for reset in resets_seen()[0]), message


def test_limits_user_beats_groups_beat_the_site_and_the_most_generous_group_counts(user, settings):
    settings.QUOTA_TOKENS_PER_DAY, settings.QUOTA_TOKENS_PER_MONTH = 1000, 0
    assert quotas.limits_for(user) == (1000, 0)
    small, large, unlimited = (Group.objects.create(name=f"{name}-{user.pk}") for name in ("small", "large", "unlimited"))
    Quota.objects.create(group=small, tokens_per_day=100, tokens_per_month=5000)
    Quota.objects.create(group=large, tokens_per_day=200)  # no monthly limit of its own: the others decide
    Quota.objects.create(group=unlimited, tokens_per_month=0)
    user.groups.add(small, large)
    assert quotas.limits_for(user) == (200, 5000)
    user.groups.add(unlimited)
    assert quotas.limits_for(user) == (200, 0)
    Quota.objects.create(user=user, tokens_per_day=50)  # the user's own limit; their month stays the groups'
    assert quotas.limits_for(user) == (50, 0)


def test_a_quota_is_for_a_user_or_a_group(user):
    from django.core.exceptions import ValidationError

    with pytest.raises(ValidationError, match="one user or for one group"):
        Quota(user=user, group=Group.objects.create(name=f"both-{user.pk}"), tokens_per_day=1).full_clean()
    with pytest.raises(ValidationError, match="one user or for one group"):
        Quota(tokens_per_day=1).full_clean()


def test_over_the_daily_budget_every_api_answers_429_and_others_are_unaffected(stack, user, token, db_user_factory):
    Quota.objects.create(user=user, tokens_per_day=1)
    assert predict(stack.predict_url(), token).status_code == 200  # nothing used yet: under the budget
    used = used_by(user)
    assert used > 1

    response = predict(stack.predict_url(), token)
    assert response.status_code == 429
    error = response.json()["error"]
    assert error["type"] == "insufficient_quota"
    assert_daily_refusal(error["message"], used, 1)
    assert 0 < int(response.headers["Retry-After"]) <= 24 * 3600

    error, code = ws_refusal(stack.predict_ws_url(), token)
    assert code == 4429 and error["type"] == "insufficient_quota"
    assert_daily_refusal(error["message"], used, 1)

    client = OpenAI(base_url=f"{stack.url}/v1", api_key=token, max_retries=0, timeout=120)
    messages = [{"role": "user", "content": "Say hi."}]
    for stream in (False, True):
        with pytest.raises(RateLimitError) as caught:
            client.chat.completions.create(model="default", messages=messages, max_tokens=2, stream=stream)
        assert caught.value.code == "insufficient_quota" and caught.value.type == "insufficient_quota"
        assert_daily_refusal(caught.value.message, used, 1)
        assert 0 < int(caught.value.response.headers["Retry-After"]) <= 24 * 3600
    with pytest.raises(RateLimitError):
        client.embeddings.create(model="default", input="Say hi.")
    assert RequestLog.objects.filter(user=user).count() == 1  # refusals store nothing

    other = token_create(user=db_user_factory())[1]
    assert predict(stack.predict_url(), other).status_code == 200


def test_a_request_running_when_the_budget_runs_out_finishes(stack, user, token):
    assert predict(stack.predict_url(), token).status_code == 200  # stored usage, and no budget yet
    ws = websocket.create_connection(stack.predict_ws_url(), header=[f"Authorization: {token}"], timeout=300)
    try:
        ws.send(json.dumps({"prompt": "Count from one to twenty.", "max_new_tokens": 24, "temperature": 0}))
        pieces = [clients.receive(ws)]  # the first text: the request is running
        Quota.objects.create(user=user, tokens_per_day=1)  # what is stored already is over it
        while (piece := clients.receive(ws)) != EOS:
            pieces.append(piece)
        ws.send(json.dumps(ASK))  # the next message is refused, and the socket closed
        error = clients.receive_json(ws)["error"]
        opcode, frame = ws.recv_data(control_frame=True)
    finally:
        ws.close()
    running = RequestLog.objects.filter(user=user, protocol="websocket").get()
    assert running.status == "ok" and running.response == "".join(pieces)
    assert error["type"] == "insufficient_quota" and struct.unpack("!H", frame[:2])[0] == 4429
    assert_daily_refusal(error["message"], used_by(user), 1)


def test_the_monthly_count_is_the_same_in_a_fresh_web_process_and_after_a_rebuild(stack, user, token):
    Quota.objects.create(user=user, tokens_per_month=1)
    assert predict(stack.predict_url(), token).status_code == 200
    used = used_by(user)
    expected = f"Your monthly token budget is used up: {used:,} of 1 tokens this month (UTC)."

    web, url = start_web()  # a new Daphne: nothing it knows came from the first one's memory
    try:
        response = predict(f"{url}/api/predict/default", token)
    finally:
        web.stop()
    assert response.status_code == 429
    message = response.json()["error"]["message"]
    assert expected in message and any(reset in message for reset in resets_seen()[1]), message
    assert 0 < int(response.headers["Retry-After"]) <= 31 * 24 * 3600

    call_command("rebuild_usage", verbosity=0)  # the rollup counted again from the stored rows
    with pytest.raises(QuotaExceeded, match=re.escape(expected)):
        quotas.check(user=user)


def test_the_admin_adds_a_group_quota_and_refuses_one_for_a_user_and_a_group(db_user_factory):
    from django.test import Client

    client = Client()
    client.force_login(db_user_factory(is_staff=True, is_superuser=True), backend="django.contrib.auth.backends.ModelBackend")
    member, group = db_user_factory(), Group.objects.create(name=f"students-{uuid.uuid4().hex[:8]}")
    member.groups.add(group)
    both = client.post("/admin/chat/quota/add/", {"user": member.pk, "group": group.pk, "tokens_per_day": 10, "tokens_per_month": ""})
    assert both.status_code == 200 and "A quota is for one user or for one group." in both.content.decode()
    added = client.post("/admin/chat/quota/add/", {"user": "", "group": group.pk, "tokens_per_day": 10, "tokens_per_month": ""})
    assert added.status_code == 302
    assert quotas.limits_for(member) == (10, 0)
    assert client.get("/admin/chat/quota/").status_code == 200
