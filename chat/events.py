"""The per-request token stream over Redis pub/sub, and the cancel flag a worker watches.

Events are the typed events of llmsite.contract, one JSON object each on the request's channel.
The web tier subscribes before it enqueues, so no event is published before anyone listens.
Cancellation has one path: the web tier sets the request's cancel key (`cancel`), and the
worker's one `CancelWatcher` thread sees it and sets the generation's `threading.Event`, which is
the engine's `cancelled`.
"""

import asyncio
import contextlib
import logging
import threading
import time

import redis.asyncio as aioredis
from django.conf import settings

from llmsite import contract
from llmsite.workers_alive import queue_alive_key, sync_client, worker_host_key  # noqa: F401  (the key names and the client live there)

CANCEL_TTL_SECONDS = 3600

log = logging.getLogger(__name__)


def channel(request_id) -> str:
    return f"llmsite:stream:{request_id}"


def cancel_key(request_id) -> str:
    return f"llmsite:cancel:{request_id}"


# --- worker side (sync) ---------------------------------------------------------------------


def publish(request_id, event: contract.Event) -> None:
    sync_client().publish(channel(request_id), contract.encode(event))


def is_cancelled(request_id) -> bool:
    return bool(sync_client().exists(cancel_key(request_id)))


class CancelWatcher:
    """Which of this process's running generations were cancelled (Stop, client gone), read by one
    thread for all of them: one MGET every `interval` seconds instead of a Redis call per stream
    every check (32 streams polled 320 times a second, each call CPU the model's threads lack).
    Each watched generation gets a `threading.Event` that this thread sets: the engine's
    `cancelled` is that event's `is_set`, and it aborts the request at its next step.
    A Redis error is logged and the next round asks again."""

    def __init__(self, interval: float = 0.05):
        self.interval = interval
        self._flags: dict[str, threading.Event] = {}
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    def watch(self, request_id) -> threading.Event:
        with self._lock:
            flag = self._flags[str(request_id)] = threading.Event()
            if self._thread is None or not self._thread.is_alive():  # (a thread does not survive a fork)
                self._thread = threading.Thread(target=self._run, name="cancel-watcher", daemon=True)
                self._thread.start()
        return flag

    @contextlib.contextmanager
    def watching(self, request_id):
        """The request's cancel flag while the block runs."""
        flag = self.watch(request_id)
        try:
            yield flag
        finally:
            self.unwatch(request_id)

    def unwatch(self, request_id) -> None:
        with self._lock:
            self._flags.pop(str(request_id), None)

    def cancelled(self, request_id) -> bool:
        flag = self._flags.get(str(request_id))
        return flag is not None and flag.is_set()

    def _run(self) -> None:
        while True:
            time.sleep(self.interval)
            with self._lock:
                asked = [(r, flag) for r, flag in self._flags.items() if not flag.is_set()]
            if not asked:
                continue
            try:
                found = sync_client().mget([cancel_key(r) for r, _ in asked])
            except Exception:  # Redis gone for a while, or anything else: asked again, never given up
                log.exception("cannot read the cancel flags of %d generations", len(asked))
                time.sleep(1)
                continue
            for (_, flag), value in zip(asked, found):
                if value is not None:
                    flag.set()


cancel_watcher = CancelWatcher()


# --- web side (async) -----------------------------------------------------------------------

_async_clients: dict[int, aioredis.Redis] = {}


def async_client() -> aioredis.Redis:
    # One pool per event loop (Daphne runs one; tests may run several).
    loop_id = id(asyncio.get_running_loop())
    client = _async_clients.get(loop_id)
    if client is None:
        client = _async_clients[loop_id] = aioredis.Redis.from_url(settings.REDIS_URL)
    return client


async def cancel(request_id) -> None:
    await async_client().set(cancel_key(request_id), b"1", ex=CANCEL_TTL_SECONDS)


async def queue_has_worker(queue: str) -> bool:
    return bool(await async_client().exists(queue_alive_key(queue)))  # one key: O(1) however many keys Redis holds


async def worker_alive(hostname: str) -> bool:
    return bool(await async_client().exists(worker_host_key(hostname)))


class StreamTimeout(Exception):
    pass


class WorkerLost(StreamTimeout):
    pass


class Subscription:
    """A subscription to one request's events; iterate it, then `close()`."""

    def __init__(self, request_id):
        self.request_id = request_id
        self.pubsub = async_client().pubsub()

    async def open(self) -> "Subscription":
        await self.pubsub.subscribe(channel(self.request_id))
        return self

    async def events(self, timeout: float | None = None):
        """Yield typed events until a terminal one (final, embeddings, error); raise StreamTimeout after `timeout` s of
        silence, or WorkerLost as soon as the worker that took the request stops beating."""
        timeout = settings.STREAM_TIMEOUT_SECONDS if timeout is None else timeout
        deadline = time.monotonic() + timeout
        worker, next_check = None, time.monotonic() + settings.WORKER_HEARTBEAT_INTERVAL
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise StreamTimeout(f"No answer from the model worker within {timeout:g} seconds.")
            if worker and time.monotonic() >= next_check:
                next_check = time.monotonic() + settings.WORKER_HEARTBEAT_INTERVAL
                if not await worker_alive(worker):
                    raise WorkerLost(f"The model worker {worker} stopped while generating this answer.")
            message = await self.pubsub.get_message(ignore_subscribe_messages=True, timeout=min(left, 1.0))
            if message is None or message["type"] != "message":
                continue
            deadline = time.monotonic() + timeout
            event = contract.decode(message["data"])
            if isinstance(event, (contract.Received, contract.Start)):
                worker = event.worker
            if isinstance(event, contract.Received):
                continue  # a worker holds the request: watch it, but clients hear of it only at start
            yield event
            if isinstance(event, contract.TERMINAL):
                return

    async def close(self) -> None:
        try:
            await self.pubsub.unsubscribe()
            await self.pubsub.aclose()
        except Exception:  # closing a broken connection must not hide the real outcome
            pass
