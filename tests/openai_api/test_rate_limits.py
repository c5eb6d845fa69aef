"""Per-token limits: 429 with Retry-After on /v1 and on predict (HTTP and WebSocket); others unaffected."""

import pytest
import requests
from openai import OpenAI, RateLimitError

from chat.tokens import token_create
from tests.chat.test_predict_websocket import answers, run_client

ASK = {"prompt": "Say hi.", "max_new_tokens": 1}


def limited(user, **limits):
    token, raw = token_create(user=user)
    for name, value in limits.items():
        setattr(token, name, value)
    token.save()
    return raw


def openai_ask(client):
    return client.chat.completions.create(model="default", messages=[{"role": "user", "content": "Say hi."}], max_tokens=1)


def test_fourth_request_in_a_minute_is_429_on_v1_and_another_token_is_unaffected(stack, user, token):
    client = OpenAI(base_url=f"{stack.url}/v1", api_key=limited(user, requests_per_minute=3), max_retries=0, timeout=120)
    for _ in range(3):
        openai_ask(client)
    with pytest.raises(RateLimitError) as caught:
        openai_ask(client)
    assert int(caught.value.response.headers["Retry-After"]) >= 1
    assert caught.value.body["type"] == "rate_limit_error" and "3 requests per minute" in caught.value.body["message"]

    other = OpenAI(base_url=f"{stack.url}/v1", api_key=token, max_retries=0, timeout=120)
    assert openai_ask(other).choices[0].message.content is not None


def test_fourth_request_in_a_minute_is_429_on_predict_http(stack, user, token):
    raw = limited(user, requests_per_minute=3)
    for _ in range(3):
        assert requests.post(stack.predict_url(), headers={"Authorization": raw}, json=ASK, timeout=120).status_code == 200
    refused = requests.post(stack.predict_url(), headers={"Authorization": raw}, json=ASK, timeout=120)
    assert refused.status_code == 429
    assert int(refused.headers["Retry-After"]) >= 1
    assert refused.json()["error"]["type"] == "rate_limit_error"
    assert requests.post(stack.predict_url(), headers={"Authorization": token}, json=ASK, timeout=120).status_code == 200


def test_fourth_request_in_a_minute_is_an_error_message_on_predict_websocket(stack, user):
    received = run_client(stack.predict_ws_url(), limited(user, requests_per_minute=3), [ASK] * 4)
    replies = answers(received)
    assert len(replies) == 4
    assert all(reply and "error" not in reply[0] for reply in replies[:3])
    assert '"rate_limit_error"' in replies[3][0] and "retry after" in replies[3][0]


def test_tokens_per_minute_refuses_once_used_up(stack, user):
    raw = limited(user, tokens_per_minute=1)
    assert requests.post(stack.predict_url(), headers={"Authorization": raw}, json=ASK, timeout=120).status_code == 200
    refused = requests.post(stack.predict_url(), headers={"Authorization": raw}, json=ASK, timeout=120)
    assert refused.status_code == 429 and "tokens per minute" in refused.json()["error"]["message"]
