"""PostgreSQL dropping a worker's connections mid-answer (a server restart, a proxy's idle timeout):
the answer still ends with its final event, its record is stored, and the worker serves on.

The worker gives its connection back to its pool while an answer streams; the end of the answer
takes one again. The pool checks a connection before handing it out (CONN_HEALTH_CHECKS): without
that check the dead one is handed out, the end cannot be stored, and (before the worker published
the end regardless) the client waited for the web tier's silence timeout.
"""

import threading
import uuid

from django.db import connection

from chat.models import RequestLog
from tests.chat import clients
from tests.chat.test_stream_failures import deployment_on_queue
from tests.chat.test_worker_death import start_worker, wait_until
from tests.conftest import start_web

LONG = "Tell me a very long story about a dragon and a knight."


def drop_connections(application_name: str) -> int:
    """Terminate every PostgreSQL backend of the processes that connect under this name."""
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity WHERE application_name = %s",
            [application_name],
        )
        return cursor.fetchone()[0]


def test_connections_dropped_mid_answer_still_end_the_stream_and_store_the_answer(stack, token, user):
    queue = f"dropped-{uuid.uuid4().hex[:6]}"
    deployment = deployment_on_queue(queue)
    name = f"test-{queue}"
    worker = start_worker(queue, concurrency=2, env={"DB_APPLICATION_NAME": name})
    # a short silence timeout: a stream left without its end fails in seconds, not minutes
    web, url = start_web(env={"STREAM_TIMEOUT_SECONDS": "10"})
    predict = f"{url}/api/predict/{deployment.name}"
    body = {"prompt": LONG, "temperature": 0, "max_new_tokens": 200}
    try:
        out = clients.Received()
        thread = threading.Thread(target=clients.predict_http_stream, args=(predict, token, body, out), daemon=True)
        thread.start()
        wait_until(lambda: len(out.pieces) >= 3, 120, "the answer to begin")
        assert drop_connections(name) >= 1  # the worker's pooled connection, idle while it streams
        thread.join(180)
        assert out.ended and out.error is None, (out.error, worker.log_tail())
        row = RequestLog.objects.get(deployment=deployment)
        assert row.status == RequestLog.Status.OK, (row.status, row.error)
        assert row.response == out.pieces[-1] and row.completion_tokens >= 10

        again = clients.predict_http_stream(predict, token, {**body, "max_new_tokens": 8})
        assert again.ended and again.error is None and again.pieces
        assert worker.alive()
    finally:
        web.stop()
        worker.stop()
