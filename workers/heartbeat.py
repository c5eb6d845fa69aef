"""Worker liveness in Redis: a key per queue that every worker of that queue renews, and a key per
worker; each expires unless renewed.

The web tier refuses requests for a queue no live worker consumes (503 instead of queueing
forever) and ends a stream whose worker's key expired (the worker died) with an error.
"""

import json
import logging
import os
import threading
import time
import uuid

from django.conf import settings

from chat import events

log = logging.getLogger(__name__)

# This worker process: its key and the rows it takes name it, so a row of the same worker name
# but another run was left by a process that is gone (workers/orphans.py).
RUN = uuid.uuid4().hex
DUPLICATE_LOG_SECONDS = 60.0


def start(*, hostname: str, queues: list[str]) -> threading.Thread:
    """Beat for `hostname` now (before this worker takes a request: its key names this run from
    the first) and then every WORKER_HEARTBEAT_INTERVAL seconds. A beat that finds another run's
    value, written since this process's last beat, logs an error (two live processes under one
    name), at most once a minute."""
    value = json.dumps({"pid": os.getpid(), "queues": queues, "run": RUN})
    told = None  # when the error was last logged; None before the first beat

    def beat():
        nonlocal told
        try:
            pipe = events.sync_client().pipeline()
            for queue in queues:
                pipe.set(events.queue_alive_key(queue), hostname, ex=settings.WORKER_HEARTBEAT_TTL)
            pipe.set(events.worker_host_key(hostname), value, ex=settings.WORKER_HEARTBEAT_TTL, get=True)
            before = pipe.execute()[-1]
            if told is None:  # the first beat may find a dead process's value: a restart under its name
                told = -DUPLICATE_LOG_SECONDS
            elif before is not None and run_of(before) != RUN and time.monotonic() - told >= DUPLICATE_LOG_SECONDS:
                told = time.monotonic()
                log.error("another worker process beats as %s: give each worker its own --hostname, or the other's answers may be failed as orphaned", hostname)
        except Exception:  # Redis away: keep trying, the keys simply expire meanwhile
            log.warning("heartbeat failed", exc_info=True)

    def beat_on():
        while True:
            threading.Event().wait(settings.WORKER_HEARTBEAT_INTERVAL)
            beat()

    beat()
    thread = threading.Thread(target=beat_on, name="heartbeat", daemon=True)
    thread.start()
    return thread


def run_of(beat: bytes | str) -> str:
    """The run a heartbeat value names ("" where it names none: an older worker's)."""
    try:
        return str(json.loads(beat).get("run") or "")
    except (ValueError, TypeError, AttributeError):
        return ""
