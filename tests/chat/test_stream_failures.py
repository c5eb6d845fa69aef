"""A stream never hangs: silence from the workers and a worker dying mid-answer both end in an error."""

import json
import os
import signal
import time
import uuid

import pytest
import requests

from chat.models import Deployment, RequestLog
from llmsite.launcher import worker_command
from tests.chat.test_predict_websocket import answers, run_client
from tests.conftest import Process, start_web, wait_for_log, wait_ready

TIMEOUT = 4


@pytest.fixture(scope="module")
def short_timeout_web(stack):
    web, url = start_web(env={"STREAM_TIMEOUT_SECONDS": str(TIMEOUT), "WORKER_WAIT_SECONDS": "1"})
    yield url
    web.stop()


def hung_worker_on(queue: str) -> None:
    """A liveness key for `queue` with no worker behind it: a worker that hangs without a word."""
    from chat import events

    events.sync_client().set(events.queue_alive_key(queue), "hung@nowhere", ex=120)


def deployment_on_queue(queue: str) -> Deployment:
    base = Deployment.objects.get(name="default")
    return Deployment.objects.create(
        name=f"dep-{uuid.uuid4().hex[:8]}",
        model_source=base.model_source,
        queue=queue,
        # the web tier may count tokens as for the default model
        tokenizer_files=base.tokenizer_files,
        model_context_length=base.model_context_length,
    )


def stream(url, token, deployment, prompt, max_new_tokens=32):
    response = requests.post(
        f"{url}/api/predict/{deployment}",
        headers={"Authorization": token},
        json={"prompt": prompt, "temperature": 0, "max_new_tokens": max_new_tokens, "use_stream_chat": True},
        stream=True,
        timeout=120,
    )
    assert response.status_code == 200
    for chunk in response.iter_lines(chunk_size=8192, decode_unicode=False, delimiter=b"\0"):
        if chunk:
            yield json.loads(chunk.decode("utf-8"))


def test_no_worker_for_the_deployment_is_503_without_queueing(short_timeout_web, token, user):
    orphan = deployment_on_queue(f"nobody-listens-{uuid.uuid4().hex[:6]}")
    response = requests.post(f"{short_timeout_web}/api/predict/{orphan.name}", headers={"Authorization": token}, json={"prompt": "Hi"}, timeout=60)
    assert response.status_code == 503
    assert response.json()["error"]["type"] == "server_error"
    assert orphan.queue in response.json()["error"]["message"]
    assert not RequestLog.objects.filter(user=user).exists()


def test_no_event_within_the_timeout_ends_the_http_stream_with_an_error(short_timeout_web, token, user):
    orphan = deployment_on_queue(f"nobody-listens-{uuid.uuid4().hex[:6]}")
    hung_worker_on(orphan.queue)
    objects = list(stream(short_timeout_web, token, orphan.name, "Hello?"))
    assert objects[-1]["error"]["type"] == "server_error"
    assert str(TIMEOUT) in objects[-1]["error"]["message"]
    row = RequestLog.objects.get(user=user)
    assert row.status == RequestLog.Status.ERROR and row.error


@pytest.mark.parametrize("path, body", [
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "Hello?"}]}),
    ("/v1/responses", {"input": "Hello?"}),
])
def test_a_whole_v1_answer_that_fails_after_it_was_stored_names_its_request(short_timeout_web, token, user, path, body):
    orphan = deployment_on_queue(f"nobody-listens-{uuid.uuid4().hex[:6]}")
    hung_worker_on(orphan.queue)
    response = requests.post(
        f"{short_timeout_web}{path}", headers={"Authorization": f"Bearer {token}"}, json={"model": orphan.name, **body}, timeout=60
    )
    assert response.status_code >= 500 and str(TIMEOUT) in response.json()["error"]["message"], response.text
    row = RequestLog.objects.get(user=user)
    assert response.headers["X-Request-Id"] == str(row.pk) and row.status == RequestLog.Status.ERROR


def test_no_event_within_the_timeout_is_an_error_message_then_eos_on_websocket(short_timeout_web, token):
    orphan = deployment_on_queue(f"nobody-listens-{uuid.uuid4().hex[:6]}")
    hung_worker_on(orphan.queue)
    ws_url = "ws" + short_timeout_web[len("http") :] + f"/api/predict/{orphan.name}"
    received = run_client(ws_url, token, [{"prompt": "Hello?"}, {"prompt": "Anyone?"}])
    for answer in answers(received):
        assert json.loads(answer[0])["error"]["type"] == "server_error"


def test_worker_killed_mid_stream_ends_the_stream_with_an_error_object(stack, token, user):
    # The session's Daphne waits 120 s for silence; the dead worker's heartbeat ends it far sooner.
    queue = f"doomed-{uuid.uuid4().hex[:6]}"
    doomed = deployment_on_queue(queue)
    worker = Process(f"worker-{queue}", worker_command([queue], hostname=f"{queue}@%h")).start()
    try:
        wait_ready(doomed.name, worker)
        wait_for_log(worker, " ready.")
        objects, killed_at = [], None
        for obj in stream(stack.url, token, doomed.name, "Tell me a very long story about a dragon.", 400):
            objects.append(obj)
            if len(objects) == 3:
                os.kill(worker.popen.pid, signal.SIGKILL)
                killed_at = time.monotonic()
        assert time.monotonic() - killed_at < 15
        assert "stopped" in objects[-1]["error"]["message"]
        assert len(objects) > 3
        assert "response" in objects[-2] and objects[-2]["response"].startswith(objects[0]["response"])
        assert objects[-1] == {"error": objects[-1]["error"]} and objects[-1]["error"]["type"] == "server_error"
        time.sleep(0.5)
        assert RequestLog.objects.get(user=user).status == RequestLog.Status.ERROR
    finally:
        worker.stop()


def test_what_a_failed_answer_had_said_keeps_the_deltas_around_an_entry_that_is_no_event():
    """The row of an answer whose worker went silent or died keeps its text (chat.events.said_so_far):
    something else writing to its stream costs that one entry, not the whole text."""
    from chat import events
    from llmsite import contract

    request_id = str(uuid.uuid4())
    events.publish(request_id, contract.Delta("The Louvre "))
    events.sync_client().xadd(events.channel(request_id), {"e": b"not an event"})
    events.sync_client().xadd(events.channel(request_id), {"other": b"field"})
    events.publish(request_id, contract.Delta("The Eiffel Tower", index=1))  # a second answer (n=2): the row keeps the first's
    events.publish(request_id, contract.Delta("is in Paris."))
    assert events.said_so_far(request_id) == "The Louvre is in Paris."
