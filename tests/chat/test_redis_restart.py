"""Redis restarted mid-stream (without its data, as the embedded one runs): an answer a worker
is generating goes on through a short outage, and its stream ends with the whole answer; a request
that was waiting for its turn is ended (its place in line went with Redis's data), and no worker
starts it for a client told it failed. An outage longer than REDIS_OUTAGE_SECONDS ends the stream
with an error; the site and its worker then recover by themselves (a request within 30 s of
Redis's return succeeds).

The restart gets a Redis of its own (the suite's stays up): a worker and Daphne on a Valkey that
the test stops and starts again on the same port.
"""

import contextlib
import json
import threading
import time
import uuid

import pytest
import redis
import requests
from django.conf import settings

from chat import events
from chat.models import RequestLog
from llmsite.embedded import _free_port
from llmsite.launcher import worker_command
from llmsite.workers_alive import worker_host_key
from tests.chat.test_redis_outage import start_redis
from tests.chat.test_stream_failures import deployment_on_queue
from tests.conftest import Process, start_web, wait_for_log
from tests.metrics.conftest import wait_until


@pytest.fixture
def own_redis(tmp_path, stack):
    holder = {"port": _free_port(), "dir": tmp_path / "valkey"}
    start_redis(holder)
    yield holder
    holder["server"].stop()


def test_redis_restart_mid_stream_then_an_outage_too_long(own_redis, token):
    redis_url = f"redis://127.0.0.1:{own_redis['port']}/0"
    queue = f"redis-restart-{uuid.uuid4().hex[:6]}"
    deployment = deployment_on_queue(queue)
    type(deployment).objects.filter(pk=deployment.pk).update(max_batch_size=1)  # a second request waits its turn
    with site_on(redis_url, queue, REDIS_OUTAGE_SECONDS=str(OUTAGE_SECONDS)) as (worker, web, url):
        waiting = {}

        def then_wait_behind():
            waiting["thread"] = threading.Thread(target=lambda: waiting.update(response=post(url, deployment, token, LONG)), daemon=True)
            waiting["thread"].start()
            wait_until(lambda: RequestLog.objects.filter(deployment=deployment).count() == 2, "the second request's row", 60)

        objects = stream(url, deployment, token, {1: then_wait_behind, 3: lambda: restart(own_redis)})
        first = RequestLog.objects.filter(deployment=deployment).order_by("queued_at").first()
        assert "error" not in objects[-1], objects[-1]
        assert first.status == RequestLog.Status.OK and len(first.response) > 200
        assert objects[-1]["response"] == first.response  # the whole answer: its last object holds the final text
        waiting["thread"].join(60)
        assert "response" in waiting, "the waiting request's stream did not end within 60 s of the first's"
        assert "error" in json.loads(waiting["response"].strip(b"\0").split(b"\0")[-1])
        second = RequestLog.objects.filter(deployment=deployment).order_by("queued_at").last()
        assert (second.status, second.started_at) == (RequestLog.Status.ERROR, None)  # failed as it waited, never to start

        objects = stream(url, deployment, token, {3: lambda: own_redis["server"].stop()})
        assert "error" in objects[-1] and objects[-1]["error"]["type"] == "server_error"
        message = objects[-1]["error"]["message"]
        assert "stream" in message and str(own_redis["port"]) not in message, "Redis's own text (its address) stays in the site's log"
        third = RequestLog.objects.filter(deployment=deployment).order_by("queued_at").last()
        wait_until(lambda: RequestLog.objects.get(pk=third.pk).status == RequestLog.Status.ERROR, "the answer's row failed", 60)
        assert str(own_redis["port"]) not in RequestLog.objects.get(pk=third.pk).error

        start_redis(own_redis)
        back = time.monotonic()
        short = {"prompt": "What is the capital of France?", "temperature": 0, "max_new_tokens": 16}
        while True:
            answer = requests.post(f"{url}/api/predict/{deployment.name}", headers={"Authorization": token}, json=short, timeout=60)
            if answer.status_code == 200:
                break
            assert time.monotonic() - back < 30, answer.text
            time.sleep(1)
        assert "Paris" in answer.json()["response"]
        assert worker.alive() and web.alive()
        log = worker.log_path.read_text(errors="replace")
        assert f"generation {second.pk} started" not in log
        assert "Redis is back for appending events" in log


@contextlib.contextmanager
def site_on(redis_url: str, queue: str, **env: str):
    """A worker of `queue` and Daphne on the Redis at `redis_url` (with `env` besides), as
    (worker, web, url), the worker's beat copied into the suite's Redis (below)."""
    env = {"REDIS_URL": redis_url, **env}
    worker = Process(f"worker-{queue}", worker_command([queue], hostname=f"{queue}@%h"), env).start()
    web, stopped = None, threading.Event()
    try:
        web, url = start_web(env=env)
        wait_for_log(worker, " ready.")
        beat_for_the_suites_sweeps(redis_url, until=stopped)
        yield worker, web, url
    finally:
        stopped.set()
        if web is not None:
            web.stop()
        worker.stop()


def beat_for_the_suites_sweeps(redis_url: str, until: threading.Event) -> None:
    """Renew the worker's heartbeat key in the suite's Redis too, until `until` is set: the suite's
    worker looks for the rows of dead workers in the one database, and for their beats in its
    own Redis, where it would find this worker gone and fail its answer (workers/orphans.py)."""
    key = redis.Redis.from_url(redis_url).keys(worker_host_key("*"))[0]
    value = redis.Redis.from_url(redis_url).get(key)

    def beat():
        while not until.wait(1):
            events.sync_client().set(key, value, ex=settings.WORKER_HEARTBEAT_TTL)

    events.sync_client().set(key, value, ex=settings.WORKER_HEARTBEAT_TTL)
    threading.Thread(target=beat, daemon=True).start()


OUTAGE_SECONDS = 8  # longer than a restart takes here (about a second), short for the test
LONG = {"prompt": "Tell me a very long story about a dragon.", "temperature": 0, "max_new_tokens": 400, "use_stream_chat": True}


def stream(url: str, deployment, token: str, then: dict) -> list[dict]:
    """A streamed answer's objects; `then[n]()` runs once the n-th has come."""
    response = requests.post(f"{url}/api/predict/{deployment.name}", headers={"Authorization": token}, json=LONG, stream=True, timeout=120)
    objects = []
    for chunk in response.iter_lines(chunk_size=1, delimiter=b"\0"):
        if chunk:
            objects.append(json.loads(chunk))
            if len(objects) in then:
                then[len(objects)]()
    return objects


def restart(own_redis: dict) -> None:
    own_redis["server"].stop()
    start_redis(own_redis)


def post(url: str, deployment, token: str, body: dict) -> bytes:
    """A whole streamed answer's body."""
    return requests.post(f"{url}/api/predict/{deployment.name}", headers={"Authorization": token}, json=body, timeout=120).content
