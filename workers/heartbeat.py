"""Worker liveness in Redis: a key per queue that every worker of that queue renews, and a key per
worker; each expires unless renewed.

The web tier refuses requests for a queue no live worker consumes (503 instead of queueing
forever) and ends a stream whose worker's key expired (the worker died) with an error.
"""

import json
import logging
import os
import threading

from django.conf import settings

from chat import events

log = logging.getLogger(__name__)


def start(*, hostname: str, queues: list[str]) -> threading.Thread:
    def beat():
        while True:
            try:
                client = events.sync_client()
                value = json.dumps({"pid": os.getpid(), "queues": queues})
                pipe = client.pipeline()
                for queue in queues:
                    pipe.set(events.queue_alive_key(queue), hostname, ex=settings.WORKER_HEARTBEAT_TTL)
                pipe.set(events.worker_host_key(hostname), value, ex=settings.WORKER_HEARTBEAT_TTL)
                pipe.execute()
            except Exception:  # Redis away: keep trying, the keys simply expire meanwhile
                log.warning("heartbeat failed", exc_info=True)
            threading.Event().wait(settings.WORKER_HEARTBEAT_INTERVAL)

    thread = threading.Thread(target=beat, name="heartbeat", daemon=True)
    thread.start()
    return thread
