"""A client that goes away cancels its generation on the worker; the row keeps what was generated."""

import json
import time

import requests
import websocket

from chat.models import RequestLog
from tests.chat import clients

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
    pieces = [clients.receive(ws) for _ in range(3)]
    ws.close()
    row = wait_for_status(user, RequestLog.Status.CANCELLED)
    assert row.response.startswith("".join(pieces))
    assert row.completion_tokens < 600


def test_after_a_cancel_the_worker_answers_the_next_request(stack, token, user):
    ws = websocket.create_connection(stack.predict_ws_url(), header=[f"Authorization: {token}"], timeout=60)
    ws.send(json.dumps(LONG))
    clients.receive(ws)
    ws.close()
    wait_for_status(user, RequestLog.Status.CANCELLED)
    answer = requests.post(
        stack.predict_url(), headers={"Authorization": token}, json={"prompt": "What is the capital of France?", "temperature": 0, "max_new_tokens": 24}, timeout=120
    )
    assert "Paris" in answer.json()["response"]


def test_one_watcher_reads_the_cancel_flags_of_every_running_generation():
    """The worker's streams do not each ask Redis: one thread reads every watched request's flag
    (one MGET a round) and each stream looks at its own."""
    import uuid

    from chat.events import CancelWatcher, cancel_key, sync_client

    watcher = CancelWatcher(interval=0.02)
    ids = [uuid.uuid4().hex for _ in range(3)]
    rounds = []
    real_mget = sync_client().mget
    sync_client().mget = lambda keys: rounds.append(len(keys)) or real_mget(keys)
    try:
        for request_id in ids:
            watcher.watch(request_id)
        sync_client().set(cancel_key(ids[1]), b"1", ex=60)
        deadline = time.monotonic() + 10
        while not watcher.cancelled(ids[1]):
            assert time.monotonic() < deadline, "the cancel was never seen"
            time.sleep(0.01)
        assert not watcher.cancelled(ids[0]) and not watcher.cancelled(ids[2])
        assert rounds and max(rounds) == 3  # all three in one call
        watcher.unwatch(ids[1])
        assert not watcher.cancelled(ids[1])  # a finished generation is forgotten
    finally:
        del sync_client().mget
        for request_id in ids:
            watcher.unwatch(request_id)


def test_a_cancelled_reader_of_a_busy_stream_ends_every_time(stack):
    """The web tier's reader of a request's events (a client gone, Stop) is cancelled while events
    keep coming, 100 times at moments spread over its reads: each time it ends as cancelled (the
    Redis client swallows such a cancel now and then: chat.stream_reader.raise_if_cancelled)."""
    import asyncio
    import random
    import threading
    import uuid

    from chat import events
    from llmsite import contract

    async def read(subscription):
        async for _ in subscription.events(timeout=120):
            pass

    async def rounds():
        random.seed(0)
        for n in range(100):
            request_id, stop = str(uuid.uuid4()), threading.Event()

            def publish():
                while not stop.is_set():
                    events.publish(request_id, contract.Delta("x"))
                    time.sleep(0.001)

            publisher = threading.Thread(target=publish)
            publisher.start()
            try:
                subscription = await events.Subscription(request_id, listen=True).open()
                reader = asyncio.create_task(read(subscription))
                await asyncio.sleep(random.uniform(0.005, 0.05))
                reader.cancel()
                await asyncio.wait({reader}, timeout=60)  # a bound on waiting, not a speed check
                assert reader.cancelled(), f"round {n}: the reader went on after its cancel ({reader})"
            finally:
                stop.set()
                publisher.join()
                reader.cancel()

    asyncio.run(rounds())
