"""A worker killed mid-answer: every client of a running answer hears an error at once, the rows
say error, a request that was waiting for its turn is not lost with the worker (workers take
waiting requests from the deployment's line only when they have room: llmsite/admission.py), a
new worker serves it, and no generation ever runs twice.
"""

import os
import re
import signal
import threading
import time
import uuid


from chat.models import RequestLog
from llmsite.launcher import worker_command
from tests.chat import clients
from tests.chat.test_stream_failures import deployment_on_queue
from tests.conftest import Process, wait_for_log

LONG = "Tell me a very long story about a dragon and a knight."


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
    type(deployment).objects.filter(pk=deployment.pk).update(max_batch_size=3)
    users = [db_user_factory() for _ in range(4)]
    tokens = [token_create(user=u)[1] for u in users]
    body = {"prompt": LONG, "temperature": 0, "max_new_tokens": 400}
    # Three running answers fill the worker's room for the deployment; a fourth waits in the line,
    # so the kill catches one request of each kind.
    worker = start_worker(queue, concurrency=3, env={})
    try:
        streams = [
            in_thread(clients.predict_http_stream, stack.predict_url(deployment.name), tokens[0], body),
            in_thread(clients.predict_ws_stream, stack.predict_ws_url(deployment.name), tokens[1], body),
            in_thread(clients.openai_sse_stream, stack.url, tokens[2], {"model": deployment.name, "messages": [{"role": "user", "content": LONG}], "max_tokens": 400, "temperature": 0}),
        ]
        wait_until(lambda: all(len(out.pieces) >= 2 for _, out in streams), 300, "three streams under way")
        short = {"prompt": "What is the capital of France?", "temperature": 0, "max_new_tokens": 16}
        waiting_stream = in_thread(clients.predict_ws_stream, stack.predict_ws_url(deployment.name), tokens[3], short)
        wait_until(lambda: RequestLog.objects.filter(user=users[3]).exists(), 60, "the fourth request's row")
        waiting = RequestLog.objects.get(user=users[3])

        os.kill(worker.popen.pid, signal.SIGKILL)
        killed_at = time.monotonic()
        for thread, _ in streams:
            thread.join(60)
        heard = [round(out.error_at - killed_at, 1) if out.error_at else None for _, out in streams]
        print(f"\nworker SIGKILL: seconds until each client got the error (HTTP, WebSocket, SSE): {heard}")
        for (_, out), protocol in zip(streams, ["HTTP stream", "WebSocket", "SSE"]):
            assert out.error is not None, f"{protocol}: no error event ({len(out.pieces)} pieces)"
            assert out.error["type"] == "server_error", (protocol, out.error)
            assert "stopped" in out.error["message"], (protocol, out.error)
            assert out.error_at - killed_at < 10, f"{protocol}: the error came {out.error_at - killed_at:.1f} s after the kill"
        assert all(out.pieces for _, out in streams)
        rows = RequestLog.objects.filter(user__in=users[:3])
        assert sorted(r.status for r in rows) == [RequestLog.Status.ERROR] * 3
        said = RequestLog.objects.get(user=users[1]).response  # the WebSocket's row: what the dead worker said is kept
        assert said and said.startswith("".join(streams[1][1].pieces)), (said, streams[1][1].pieces)
        assert RequestLog.objects.get(pk=waiting.pk).status == RequestLog.Status.QUEUED  # still in line

        restarted = start_worker(queue, concurrency=3, env={})
        try:
            waiting_stream[0].join(300)
            out = waiting_stream[1]
            assert out.error is None and out.ended, out.error
            served = RequestLog.objects.get(pk=waiting.pk)
            assert served.status == RequestLog.Status.OK and "Paris" in served.response
            assert "".join(out.pieces) == served.response
            for row in rows:
                assert log_count(restarted, f"generation {row.id} started") == 0
                assert RequestLog.objects.get(pk=row.pk).status == RequestLog.Status.ERROR
        finally:
            restarted.stop()
    finally:
        worker.stop()
