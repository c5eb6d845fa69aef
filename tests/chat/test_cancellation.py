"""A client that goes away cancels its generation on the worker; the row keeps what was generated."""

import json
import time

import requests
import websocket

from chat.models import RequestLog

LONG = {"prompt": "Tell me a very long story about a dragon and a knight.", "temperature": 0, "max_new_tokens": 600}


def wait_for_status(user, status, timeout=15):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        row = RequestLog.objects.filter(user=user).first()
        if row is not None and row.status == status:
            return row
        time.sleep(0.1)
    raise AssertionError(f"request of {user} never became {status}: {RequestLog.objects.filter(user=user).first()}")


def test_http_client_closing_mid_stream_cancels_the_generation(stack, token, user):
    response = requests.post(
        stack.predict_url(), headers={"Authorization": token}, json={**LONG, "use_stream_chat": True}, stream=True, timeout=120
    )
    chunks = response.iter_lines(chunk_size=1, decode_unicode=False, delimiter=b"\0")
    seen = [json.loads(next(c for c in chunks if c)) for _ in range(3)]
    response.close()
    row = wait_for_status(user, RequestLog.Status.CANCELLED)
    assert row.finish_reason == "cancelled"
    assert row.response.startswith(seen[-1]["response"])
    assert 3 <= row.completion_tokens < 600


def test_websocket_closing_mid_stream_cancels_the_generation(stack, token, user):
    ws = websocket.create_connection(stack.predict_ws_url(), header=[f"Authorization: {token}"], timeout=60)
    ws.send(json.dumps(LONG))
    pieces = [ws.recv() for _ in range(3)]
    ws.close()
    row = wait_for_status(user, RequestLog.Status.CANCELLED)
    assert row.response.startswith("".join(pieces))
    assert row.completion_tokens < 600


def test_after_a_cancel_the_worker_answers_the_next_request(stack, token, user):
    ws = websocket.create_connection(stack.predict_ws_url(), header=[f"Authorization: {token}"], timeout=60)
    ws.send(json.dumps(LONG))
    ws.recv()
    ws.close()
    wait_for_status(user, RequestLog.Status.CANCELLED)
    answer = requests.post(
        stack.predict_url(), headers={"Authorization": token}, json={"prompt": "What is the capital of France?", "temperature": 0, "max_new_tokens": 24}, timeout=120
    )
    assert "Paris" in answer.json()["response"]
