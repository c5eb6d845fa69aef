"""Two workers on one deployment queue share its load."""

import threading
import uuid

import requests

from chat.models import Deployment, RequestLog
from llmsite.launcher import worker_command
from tests.chat.test_stream_failures import deployment_on_queue
from tests.conftest import Process, wait_for_log, wait_ready


def test_two_workers_on_one_queue_both_serve_under_concurrent_load(stack, token, user):
    queue = f"shared-{uuid.uuid4().hex[:6]}"
    deployment = deployment_on_queue(queue)
    # Room for 4 answers a worker: a worker takes waiting requests only while it has room, so the
    # 12 requests cannot all go to whichever worker hears of them first.
    Deployment.objects.filter(pk=deployment.pk).update(max_batch_size=4)
    workers = [
        Process(f"worker-{queue}-{n}", worker_command([queue], hostname=f"{n}-{queue}@%h", concurrency=4)).start()
        for n in ("a", "b")
    ]
    try:
        for worker in workers:
            wait_ready(deployment.name, worker)
            wait_for_log(worker, " ready.")  # Celery's line once it consumes (after loading)
        statuses = []

        def ask(i):
            response = requests.post(
                stack.predict_url(deployment.name),
                headers={"Authorization": token},
                json={"prompt": f"Count from 1 to {i + 3}.", "temperature": 0, "max_new_tokens": 24},
                timeout=300,
            )
            statuses.append(response.status_code)

        threads = [threading.Thread(target=ask, args=(i,)) for i in range(12)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(600)
        assert statuses == [200] * 12
        served_by = set(RequestLog.objects.filter(user=user).values_list("worker", flat=True))
        assert {name.split("@")[0] for name in served_by} == {f"a-{queue}", f"b-{queue}"}
    finally:
        for worker in workers:
            worker.stop()
