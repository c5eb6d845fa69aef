"""A worker killed mid-answer, and a broker that hands a message out twice: every client hears an
error at once, the rows say error, a new worker serves on, and no generation ever runs twice.

The workers here get a 2-second broker visibility timeout, restored every second, so any message a
dead or busy worker still held is handed out again within the test: the row's claim refuses it.
"""

import json
import os
import re
import signal
import threading
import time
import uuid

import requests
import websocket

from chat.models import RequestLog
from llmsite.launcher import worker_command
from tests.chat import clients
from tests.chat.test_stream_failures import deployment_on_queue
from tests.conftest import Process, wait_for_log

LONG = "Tell me a very long story about a dragon and a knight."
# A message held unacknowledged for 2 s is given out again; kombu looks every second.
FAST_REDELIVERY = {
    "BROKER_VISIBILITY_TIMEOUT": "2",
    "BROKER_TRANSPORT_OPTIONS": json.dumps({"unacked_restore_interval": 1, "unacked_restore_throttle": 1}),
}


def start_worker(queue: str, *, concurrency: int, env: dict) -> Process:
    name = f"{queue}-{uuid.uuid4().hex[:4]}"
    worker = Process(f"worker-{name}", worker_command([queue], hostname=f"{name}@%h", concurrency=concurrency), env).start()
    wait_for_log(worker, " ready.")
    return worker


def log_count(worker: Process, pattern: str) -> int:
    return len(re.findall(pattern, worker.log_path.read_text(errors="replace")))


def in_thread(func, *args) -> tuple[threading.Thread, clients.Received]:
    out = clients.Received()

    def run():
        try:
            func(*args, out)
        except Exception as exc:  # the assertion below names what the client saw
            out.fail({"message": f"client failed: {exc!r}", "type": "client"})

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, out


def wait_until(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def test_worker_killed_mid_stream_errors_every_protocol_and_a_new_worker_serves_without_rerunning(stack, db_user_factory):
    from chat.tokens import token_create

    queue = f"killed-{uuid.uuid4().hex[:6]}"
    deployment = deployment_on_queue(queue)
    users = [db_user_factory() for _ in range(4)]
    tokens = [token_create(user=u)[1] for u in users]
    body = {"prompt": LONG, "temperature": 0, "max_new_tokens": 400}
    # Three running answers take the worker's three threads; a fourth waits on the worker, fetched
    # but not started, so the kill catches one request of each kind.
    worker = start_worker(queue, concurrency=3, env=FAST_REDELIVERY)
    try:
        streams = [
            in_thread(clients.predict_http_stream, stack.predict_url(deployment.name), tokens[0], body),
            in_thread(clients.predict_ws_stream, stack.predict_ws_url(deployment.name), tokens[1], body),
            in_thread(clients.openai_sse_stream, stack.url, tokens[2], {"model": deployment.name, "messages": [{"role": "user", "content": LONG}], "max_tokens": 400, "temperature": 0}),
        ]
        wait_until(lambda: all(len(out.pieces) >= 2 for _, out in streams), 300, "three streams under way")
        streams.append(in_thread(clients.predict_ws_stream, stack.predict_ws_url(deployment.name), tokens[3], body))
        wait_until(lambda: RequestLog.objects.filter(user=users[3]).exists(), 60, "the fourth request's row")
        waiting = RequestLog.objects.get(user=users[3])
        wait_for_log(worker, f"workers.generate[{waiting.id}] received", timeout=60)

        os.kill(worker.popen.pid, signal.SIGKILL)
        killed_at = time.monotonic()
        for thread, _ in streams:
            thread.join(60)
        heard = [round(out.error_at - killed_at, 1) if out.error_at else None for _, out in streams]
        print(f"\nworker SIGKILL: seconds until each client got the error (HTTP, WebSocket, SSE, queued WebSocket): {heard}")
        for (_, out), protocol in zip(streams, ["HTTP stream", "WebSocket", "SSE", "queued WebSocket"]):
            assert out.error is not None, f"{protocol}: no error event ({len(out.pieces)} pieces)"
            assert out.error["type"] == "server_error", (protocol, out.error)
            assert "stopped" in out.error["message"], (protocol, out.error)
            assert out.error_at - killed_at < 10, f"{protocol}: the error came {out.error_at - killed_at:.1f} s after the kill"
        assert all(out.pieces for _, out in streams[:3])
        rows = RequestLog.objects.filter(user__in=users)
        assert sorted(r.status for r in rows) == [RequestLog.Status.ERROR] * 4
        assert RequestLog.objects.get(user=users[3]).started_at is None

        restarted = start_worker(queue, concurrency=3, env=FAST_REDELIVERY)
        try:
            # The dead worker's unacknowledged message comes back from the broker and is refused.
            wait_for_log(restarted, f"generation {waiting.id} not run: its request is already error", timeout=60)
            answer = requests.post(
                stack.predict_url(deployment.name),
                headers={"Authorization": tokens[0]},
                json={"prompt": "What is the capital of France?", "temperature": 0, "max_new_tokens": 16},
                timeout=120,
            )
            assert answer.status_code == 200 and "Paris" in answer.json()["response"]
            for row in rows:
                assert log_count(restarted, f"generation {row.id} started") == 0
                assert RequestLog.objects.get(pk=row.pk).status == RequestLog.Status.ERROR
        finally:
            restarted.stop()
    finally:
        worker.stop()


def test_a_message_redelivered_after_the_visibility_timeout_is_not_generated_twice(stack, db_user_factory):
    from chat.tokens import token_create

    queue = f"redelivered-{uuid.uuid4().hex[:6]}"
    deployment = deployment_on_queue(queue)
    first_user, second_user = db_user_factory(), db_user_factory()
    # One thread: the second request waits on the busy worker, fetched but unacknowledged, for
    # longer than the 2-second visibility timeout, so the broker hands it out again, and an idle
    # second worker takes that copy while the first still holds the original.
    busy = start_worker(queue, concurrency=1, env=FAST_REDELIVERY)
    idle = None
    try:
        url = stack.predict_ws_url(deployment.name)
        first = websocket.create_connection(url, header=[f"Authorization: {token_create(user=first_user)[1]}"], timeout=300)
        first.send(json.dumps({"prompt": LONG, "temperature": 0, "max_new_tokens": 600}))
        first_pieces = [first.recv()]
        short_body = {"prompt": "What is the capital of France?", "temperature": 0, "max_new_tokens": 16}
        second = in_thread(clients.predict_ws_stream, url, token_create(user=second_user)[1], short_body)
        wait_until(lambda: RequestLog.objects.filter(user=second_user).exists(), 60, "the second request's row")
        rows = {u: RequestLog.objects.get(user=u) for u in (first_user, second_user)}
        wait_for_log(busy, f"workers.generate[{rows[second_user].id}] received", timeout=60)
        idle = start_worker(queue, concurrency=1, env=FAST_REDELIVERY)
        second[0].join(300)
        first_pieces.append(first.recv())
        first.close()  # the first answer, cancelled, frees the busy worker's thread for its copy
        refused = f"generation {rows[second_user].id} not run: its request is already"
        wait_until(lambda: any(log_count(w, re.escape(refused)) for w in (busy, idle)), 120, "the second delivery refused")

        def total(pattern):
            return sum(log_count(w, pattern) for w in (busy, idle))

        received = {u: total(rf"workers\.generate\[{rows[u].id}\] received") for u in rows}
        started = {u: total(f"generation {rows[u].id} started") for u in rows}
        print(f"\nvisibility timeout 2 s: deliveries {list(received.values())}, generations run {list(started.values())}")
        assert received[second_user] >= 2
        assert started == {first_user: 1, second_user: 1}
        out = second[1]
        assert out.error is None and out.ended
        row = RequestLog.objects.get(pk=rows[second_user].pk)
        assert row.status == RequestLog.Status.OK and "Paris" in row.response
        assert "".join(out.pieces) == row.response  # streamed once: no text twice
        first_row = RequestLog.objects.get(pk=rows[first_user].pk)
        assert first_row.status == RequestLog.Status.CANCELLED and first_row.response.startswith("".join(first_pieces))
    finally:
        busy.stop()
        if idle is not None:
            idle.stop()
