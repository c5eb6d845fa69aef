"""Case 16: more generations at once than a deployment's limit get 429 at once (no queue), on every
protocol; a slot is given back when its stream ends, and a web process that dies does not keep its
slots for good (their leases expire)."""

import json
import time
import uuid

import pytest
import requests
import websocket

from chat.models import Deployment, RequestLog
from tests.chat import clients

LIMIT = 2
# Greedy SmolLM2 counts on for hundreds of tokens: the two streams are still running when the
# third request comes (the test checks that they were, so it cannot pass by luck).
LONG_PROMPT = "Count from 1 to 300, writing each number on its own line."
FREE_DEADLINE = 120  # a bound on polling, not a speed check


@pytest.fixture
def limited(stack):
    deployment = Deployment.objects.get(name="default")
    deployment.pk, deployment.name = None, f"limited-{uuid.uuid4().hex[:8]}"
    deployment.queue, deployment.max_concurrent_generations = "default", LIMIT
    deployment.save()
    return deployment


def open_stream(base_url, token, name, max_new_tokens=400):
    """A streaming predict request whose first piece has arrived (so its generation is running)."""
    response = requests.post(
        f"{base_url}/api/predict/{name}",
        headers={"Authorization": token},
        json={"prompt": LONG_PROMPT, "use_stream_chat": True, "max_new_tokens": max_new_tokens, "temperature": 0},
        stream=True,
        timeout=300,
    )
    assert response.status_code == 200, response.text
    pieces = response.iter_lines(chunk_size=64, delimiter=b"\0")
    first = next(p for p in pieces if p)
    assert "response" in json.loads(first), first
    return response, pieces


def short_request(base_url, token, name):
    return requests.post(
        f"{base_url}/api/predict/{name}", headers={"Authorization": token}, json={"prompt": "Hi", "max_new_tokens": 2}, timeout=300
    )


def assert_429(response):
    assert response.status_code == 429, response.text
    assert int(response.headers["Retry-After"]) >= 1
    error = response.json()["error"]
    assert error["type"] == "rate_limit_error"
    assert str(LIMIT) in error["message"]


def wait_admitted(base_url, token, name):
    """Poll until a short request is answered (the slots came back); the last answer."""
    deadline = time.monotonic() + FREE_DEADLINE
    while True:
        response = short_request(base_url, token, name)
        if response.status_code != 429 or time.monotonic() > deadline:
            return response
        time.sleep(0.5)


def test_a_third_generation_over_a_limit_of_two_gets_429_at_once_on_every_protocol(stack, token, limited):
    streams = [open_stream(stack.url, token, limited.name) for _ in range(LIMIT)]
    stored = RequestLog.objects.filter(deployment=limited).count()

    assert_429(short_request(stack.url, token, limited.name))
    # Refused while the two were really still generating.
    running = RequestLog.objects.filter(deployment=limited, status__in=[RequestLog.Status.QUEUED, RequestLog.Status.RUNNING])
    assert running.count() == LIMIT
    body = {"model": limited.name, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}
    assert_429(requests.post(f"{stack.url}/v1/chat/completions", headers={"Authorization": f"Bearer {token}"}, json=body, timeout=60))
    ws = websocket.create_connection(stack.predict_ws_url(limited.name), header=[f"Authorization: {token}"], timeout=60)
    try:
        ws.send(json.dumps({"prompt": "Hi", "max_new_tokens": 2}))
        error = clients.receive_json(ws)["error"]
        assert error["type"] == "rate_limit_error" and str(LIMIT) in error["message"]
        assert clients.receive(ws) == "<EOS>"
    finally:
        ws.close()

    # Refused before anything was stored or queued.
    assert RequestLog.objects.filter(deployment=limited).count() == stored

    # A stream that ends (here: its client leaves, which cancels it) gives its slot back.
    for response, _ in streams:
        response.close()
    answered = wait_admitted(stack.url, token, limited.name)
    assert answered.status_code == 200, answered.text
    assert answered.json()["response"]


def test_slots_of_a_web_process_that_died_expire_with_their_lease(stack, token, limited):
    from tests.conftest import start_web

    web, url = start_web(env={"GENERATION_LEASE_SECONDS": "10"})
    try:
        streams = [open_stream(url, token, limited.name, max_new_tokens=60) for _ in range(LIMIT)]
        web.popen.kill()  # SIGKILL: no stream is closed, no slot given back
        web.popen.wait()
        assert_429(short_request(stack.url, token, limited.name))
    finally:
        web.stop()
    for response, _ in streams:
        response.close()
    answered = wait_admitted(stack.url, token, limited.name)
    assert answered.status_code == 200, answered.text


def test_a_request_whose_worker_waits_for_the_model_keeps_its_slot(stack, limited, settings):
    """While its worker waits for the model's load, it says so on the request's stream (a
    `received` every few seconds, never relayed to the client: as workers/services.py does, played
    here): the web tier renews the request's slot on it, so a load longer than the lease does not
    free the slot of a request still in flight."""
    import asyncio
    import threading

    from chat import concurrency, events
    from chat.in_flight import Generation
    from llmsite import contract

    settings.GENERATION_LEASE_SECONDS = 2
    request_id, seen = str(uuid.uuid4()), []

    def worker(slot):
        for _ in range(8):  # 4 s of waiting: twice the lease
            time.sleep(0.5)
            events.publish(request_id, contract.Received(worker=""))
        time.sleep(0.5)  # the last one read
        redis = events.sync_client()
        seconds, micros = redis.time()  # the clock the leases are scored on
        seen.append((redis.zscore(slot.key, slot.member), seconds + micros / 1e6))  # before the answer's end renews it
        events.publish(request_id, contract.Final(text="Paris", finish_reason="stop"))

    async def listen():
        slot = await concurrency.acquire(deployment=limited)
        generation = Generation(request_id, await events.Subscription(request_id).open(), slot=slot, deployment=limited.name)
        threading.Thread(target=worker, args=(slot,)).start()
        heard = [event async for event in generation.events()]
        await generation.close()
        return heard

    heard = asyncio.run(listen())
    assert [type(event) for event in heard] == [contract.Final], heard
    [(lease_ends, now)] = seen
    assert lease_ends is not None and lease_ends > now, "the slot's lease was renewed while the worker waited"


def test_a_client_that_leaves_while_its_request_is_stored_gives_its_slot_back_at_once(stack, token, limited):
    """Storing the request waits here (its row refers to the deployment's row, which the test holds
    locked) and the client leaves meanwhile: its slot was held for the whole lease
    (GENERATION_LEASE_SECONDS, minutes); now it goes back as the view is cancelled. The request,
    stored once the lock goes, has nobody listening and still ends."""
    import http.client
    import threading
    from urllib.parse import urlsplit

    from django.db import connection, connections, transaction

    from chat import concurrency, events

    locked, unlock = threading.Event(), threading.Event()

    def hold_the_deployment_row():
        try:
            with transaction.atomic():
                Deployment.objects.select_for_update().get(pk=limited.pk)
                locked.set()
                unlock.wait(120)
        finally:
            connections.close_all()

    def waiting_insert() -> bool:
        with connection.cursor() as cursor:
            cursor.execute(
                "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' AND query LIKE %s",
                ['INSERT INTO "chat_requestlog"%'],
            )
            return cursor.fetchone()[0] > 0

    holder = threading.Thread(target=hold_the_deployment_row)
    holder.start()
    slots, key = events.sync_client(), concurrency.key(limited.pk)
    try:
        assert locked.wait(30)
        address = urlsplit(stack.url)
        client = http.client.HTTPConnection(address.hostname, address.port, timeout=30)
        body = json.dumps({"prompt": LONG_PROMPT, "max_new_tokens": 400, "temperature": 0})
        client.request("POST", f"/api/predict/{limited.name}", body, {"Authorization": token, "Content-Type": "application/json"})
        deadline = time.monotonic() + FREE_DEADLINE
        while not slots.zcard(key):
            assert time.monotonic() < deadline, "the request never took its slot"
            time.sleep(0.05)
        while not waiting_insert():  # the request's row is being stored, behind the lock
            assert time.monotonic() < deadline, "the request's INSERT never waited for the lock"
            time.sleep(0.05)
        client.close()  # the client leaves
        deadline = time.monotonic() + 30
        while slots.zcard(key) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert slots.zcard(key) == 0, "the slot of a request whose client left is still held"
    finally:
        unlock.set()
        holder.join()
    deadline = time.monotonic() + FREE_DEADLINE
    while time.monotonic() < deadline:
        row = RequestLog.objects.filter(deployment=limited).first()
        if row is not None and row.status not in (RequestLog.Status.QUEUED, RequestLog.Status.RUNNING):
            break
        time.sleep(0.5)
    assert row is not None and row.status in (RequestLog.Status.OK, RequestLog.Status.CANCELLED), row
