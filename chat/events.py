"""The per-request event stream in a Redis Stream, the listeners' lease, and the cancel flag a
worker watches.

Events are the typed events of llmsite.contract, one JSON object each, appended (`XADD`, capped at
RESUME_MAX_EVENTS) to the request's stream, which expires RESUME_KEEP_SECONDS after its last
event; each entry also holds its append's tag (`p`), which makes a retried append one
(llmsite.redis_outage). Readers read it from any id (0: from the start), so a reader that comes
late, or comes back after a dropped connection (the chat socket's resume,
`/api/requests/<id>/events`), misses nothing and sees nothing twice; the stream's ids are the
events' ids.

Every reader of a generation renews its listen key (`listened`, a lease of RESUME_GRACE_SECONDS);
when the last one leaves, the key lapses, and a generation nobody listens to is cancelled (see
`chat.in_flight.Generation.detach`). Cancellation has one path: the web tier sets the request's
cancel key (`cancel`), and the worker's one `CancelWatcher` thread sees it and sets the
generation's `threading.Event`, which is the engine's `cancelled`.
"""

import asyncio
import contextlib
import logging
import threading
import time
import weakref

import redis.asyncio as aioredis
from django import db
from django.conf import settings

from chat import stream_reader
from chat.stream_reader import raise_if_cancelled
from llmsite import contract, redis_outage
from llmsite.text import storable
from llmsite.workers_alive import queue_alive_key, sync_client, worker_host_key  # noqa: F401  (the key names and the client live there)

CANCEL_TTL_SECONDS = 3600
OUTAGE_PAUSE_SECONDS = 0.25  # a reader's pause between reads while Redis is away

log = logging.getLogger(__name__)


def channel(request_id) -> str:
    """The request's Redis Stream (the pub/sub channel's name before streams)."""
    return f"llmsite:stream:{request_id}"


def listened_key(request_id) -> str:
    return f"llmsite:listened:{request_id}"


def cancel_key(request_id) -> str:
    return f"llmsite:cancel:{request_id}"


# --- worker side (sync) ---------------------------------------------------------------------


def publish(request_id, event: contract.Event, *, ride_out: bool = True) -> None:
    """Append `event` to the request's stream, once; a generation's own events wait for a Redis
    that is away for a moment, others (`ride_out=False`: a place in line, a sweep's error) try
    once (llmsite.redis_outage). The stream expires RESUME_KEEP_SECONDS after its last event."""
    fields = {"e": contract.encode(event)}
    redis_outage.append(
        sync_client(), channel(request_id), fields, maxlen=settings.RESUME_MAX_EVENTS, keep_seconds=settings.RESUME_KEEP_SECONDS, ride_out=ride_out
    )


def said_so_far(request_id) -> str:
    """What the request's deltas said, read back from its stream ("" once it expired, or with Redis
    away): the answer so far of a request whose worker went silent or died, kept on its row (its
    first answer's, as a finished row keeps). An entry this version cannot read (an event type of
    a newer worker, in a rolling upgrade) is left out, and the rest kept."""
    try:
        entries = sync_client().xrange(channel(request_id))
    except Exception:
        log.warning("could not read back what request %s said", request_id, exc_info=True)
        return ""
    said, tags = [], redis_outage.Tags()
    for entry_id, fields in entries:
        event = None if tags.seen(fields) else event_of(request_id, entry_id, fields)
        if isinstance(event, contract.Delta) and event.index == 0:
            said.append(event.text)
    return storable("".join(said))


def event_of(request_id, entry_id, fields: dict) -> contract.Event | None:
    """A stream entry's event; None (logged) for an entry this version cannot read: an event type
    of a newer worker, in a rolling upgrade, is left out and the rest read."""
    try:
        return contract.decode(fields[b"e"])
    except (KeyError, contract.ContractError) as exc:
        log.warning("request %s: stream entry %s is no event (%s)", request_id, entry_id, exc)
        return None


def request_cancel(request_id) -> None:
    """Ask the worker to stop the request (what `cancel` does, from a thread)."""
    sync_client().set(cancel_key(request_id), b"1", ex=CANCEL_TTL_SECONDS)


def is_cancelled(request_id) -> bool:
    return bool(sync_client().exists(cancel_key(request_id)))


class CancelWatcher:
    """Which of this process's running generations were cancelled (Stop, client gone), read by one
    thread for all of them: one MGET every `interval` seconds instead of a Redis call per stream
    every check (32 streams polled 320 times a second, each call CPU the model's threads lack).
    Each watched generation gets a `threading.Event` that this thread sets: the engine's
    `cancelled` is that event's `is_set`, and it aborts the request at its next step.
    A Redis error is logged and the next round asks again; the first round after it also counts a
    generation whose row ended meanwhile as cancelled (`_or_ended`)."""

    def __init__(self, interval: float = 0.05, client=None):
        self.interval = interval
        self._client = client  # the process's sync client where None
        self.away = False  # whether its last round found Redis away
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
                found = (self._client or sync_client()).mget([cancel_key(r) for r, _ in asked])
            except Exception:  # Redis gone for a while, or anything else: asked again, never given up
                log.exception("cannot read the cancel flags of %d generations", len(asked))
                self.away = True
                time.sleep(1)
                continue
            if self.away:  # a cancel may have been asked while Redis was away, and lost: rows tell
                self.away = False
                found = _or_ended(asked, found)
            for (_, flag), value in zip(asked, found):
                if value is not None:
                    flag.set()


def _or_ended(asked: list, found: list) -> list:
    """`found` with a mark for each asked generation whose row ended meanwhile: a web reader that
    gave up on a Redis away for too long failed it (its cancel could not reach Redis), and its
    worker would otherwise answer on for nobody."""
    from chat import lifecycle  # (lifecycle imports this module)

    try:
        ended = lifecycle.ended_among([r for r, _ in asked])
    except Exception:
        log.warning("could not look for ended rows among %d generations", len(asked), exc_info=True)
        return found
    finally:
        db.connection.close()  # this thread holds no connection between outages
    return [b"1" if r in ended else value for (r, _), value in zip(asked, found)]


cancel_watcher = CancelWatcher()


# --- web side (async) -----------------------------------------------------------------------

# Keyed by the loop itself, not its id(): a new loop never gets a client made in another (a
# client keeps its loop alive, so no new loop takes that address; the entries are not freed either).
_async_clients: "weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, aioredis.Redis]" = weakref.WeakKeyDictionary()


def async_client() -> aioredis.Redis:
    """This event loop's client, for short commands (Daphne runs one loop; tests may run several).
    Readers of events share one connection (`chat.stream_reader`), so the pool's connections are
    never held for long; where more commands are in flight at once than it holds, a command waits
    for a connection (up to 10 s) rather than failing at once."""
    loop = asyncio.get_running_loop()
    client = _async_clients.get(loop)
    if client is None:
        pool = aioredis.BlockingConnectionPool.from_url(settings.REDIS_URL, max_connections=settings.REDIS_WEB_CONNECTIONS, timeout=10)
        redis_outage.on_the_primary(pool)
        client = _async_clients[loop] = aioredis.Redis(connection_pool=pool)
    return client


async def cancel(request_id) -> None:
    await async_client().set(cancel_key(request_id), b"1", ex=CANCEL_TTL_SECONDS)


async def queue_has_worker(queue: str) -> bool:
    return bool(await async_client().exists(queue_alive_key(queue)))  # one key: O(1) however many keys Redis holds


async def worker_alive(hostname: str) -> bool:
    """Whether the worker beat within WORKER_HEARTBEAT_TTL, or may have: a Redis that restarted
    without its data since the worker's last beat forgot its key, and the next beat brings it back;
    a failover this process met lately may keep its beats from the new primary for a while."""
    client = async_client()
    if await client.exists(worker_host_key(hostname)):
        return True
    if redis_outage.failed_over_lately():  # its beats may not reach the new primary yet
        return True
    try:
        uptime = (await client.info("server")).get("uptime_in_seconds")
    except aioredis.ResponseError:  # INFO refused (an ACL user without @dangerous): no grace
        return False
    return isinstance(uptime, int) and uptime <= settings.WORKER_HEARTBEAT_TTL


async def renew_listen(request_id) -> None:
    """One listener is here: the generation counts as listened to for RESUME_GRACE_SECONDS more."""
    await async_client().set(listened_key(request_id), b"1", px=max(1, int(settings.RESUME_GRACE_SECONDS * 1000)))


async def listened(request_id) -> bool:
    return bool(await async_client().exists(listened_key(request_id)))


def id_after(event_id: str, last: str) -> bool:
    """Whether the stream id `event_id` comes after `last` ("0": before everything)."""
    return stream_reader.id_parts(event_id) > stream_reader.id_parts(last)


def valid_event_id(value) -> bool:
    try:
        id_after(value, "0")
    except (TypeError, ValueError):
        return False
    return True


class StreamTimeout(Exception):
    pass


class WorkerLost(StreamTimeout):
    pass


def worker_lost(worker: str) -> str:
    """The error of a request whose worker stopped beating (this stream's watch, workers/orphans.py)."""
    return f"The model worker {worker} stopped while generating this answer."


class Subscription:
    """A reader of one request's events from `after` on ("0": all of them); iterate it, then
    `close()`. A listener (`listen=True`) renews the request's listen key while it reads, until
    `detach()` or `close()`. `last_id` is the id of the event last yielded; `worker`, the worker
    that holds the request, once known (from its events, or given: a reader that resumes after them)."""

    def __init__(self, request_id, after: str = "0", listen: bool = False, worker: str = ""):
        self.request_id = request_id
        self.worker = worker
        self.last_id = after
        self.listening = listen
        self._renewed_at = 0.0

    async def open(self) -> "Subscription":
        await self._renew(force=True)
        return self

    async def _renew(self, force: bool = False) -> None:
        if not self.listening:
            return
        if force or time.monotonic() - self._renewed_at >= _renew_interval():
            self._renewed_at = time.monotonic()
            try:
                await renew_listen(self.request_id)
            except Exception:  # a Redis blip must not end a stream that is still flowing
                log.warning("could not renew the listen key of %s", self.request_id, exc_info=True)

    def detach(self) -> None:
        """Keep reading but stop counting as a listener (the page went away)."""
        self.listening = False

    async def _read(self, wait: float) -> list:
        """The next events after `last_id` (at most READ_BATCH), or [] after at most `wait` seconds."""
        return await stream_reader.reader(async_client()).read(channel(self.request_id), self.last_id, min(wait, 1.0, _renew_interval()))

    async def events(self, timeout: float | None = None, on_received=None, ended=None):
        """Yield typed events until a terminal one (final, embeddings, error); raise StreamTimeout after `timeout` s of
        silence, or WorkerLost as soon as the worker that took the request stops beating. A Redis
        that is away raises its error, except for a request a worker took, whose events are read on
        once it is back (for up to REDIS_OUTAGE_SECONDS: llmsite.redis_outage); after such an
        outage, `ended()` (where given) is awaited at each look at the worker once the stream has
        been silent for two, for an end event read elsewhere (its row: an end that Redis lost with
        its data). An entry that is no event this version knows is skipped. On a
        `received` (a worker holds the request, or still waits for its model) `on_received()` is
        awaited, where given; it is yielded only where it tells of that wait (`loading_seconds`)."""
        timeout = settings.STREAM_TIMEOUT_SECONDS if timeout is None else timeout
        deadline = time.monotonic() + timeout
        next_check = heard_at = time.monotonic() + settings.WORKER_HEARTBEAT_INTERVAL
        outage, rode_out, tags = redis_outage.Outage(), False, redis_outage.Tags()
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise StreamTimeout(f"No answer from the model worker within {timeout:g} seconds.")
            try:
                if self.worker and time.monotonic() >= next_check:
                    next_check = time.monotonic() + settings.WORKER_HEARTBEAT_INTERVAL
                    # Silent for two looks: the reader read all there is, and no final is on its way.
                    if rode_out and ended is not None and time.monotonic() - heard_at >= 2 * settings.WORKER_HEARTBEAT_INTERVAL:
                        if (end := await ended()) is not None:
                            yield end
                            return
                    if not await worker_alive(self.worker):
                        raise WorkerLost(worker_lost(self.worker))
                    outage.back()  # Redis answered
                await self._renew()
                found = await self._read(left)
            except redis_outage.AWAY:
                raise_if_cancelled()
                # A request a worker holds goes on there: read on from `last_id` once Redis is
                # back. One still waiting in line is ended (its place may be lost with Redis's data).
                if not self.worker or not outage.try_again():
                    raise
                rode_out = True
                await asyncio.sleep(OUTAGE_PAUSE_SECONDS)
                continue
            raise_if_cancelled()
            if found:
                outage.back()
                heard_at = time.monotonic()
            for entry_id, fields in found:
                deadline = time.monotonic() + timeout
                self.last_id = entry_id.decode() if isinstance(entry_id, bytes) else entry_id
                event = None if tags.seen(fields) else event_of(self.request_id, self.last_id, fields)  # (seen: appended twice)
                if event is None:
                    continue
                if isinstance(event, (contract.Received, contract.Start)):
                    self.worker = event.worker
                if isinstance(event, contract.Received):
                    if on_received is not None:
                        await on_received()
                    if event.loading_seconds is None:
                        continue  # a worker holds the request: watch it, but clients hear of it only at start
                yield event
                if isinstance(event, contract.TERMINAL):
                    return

    async def close(self) -> None:
        self.listening = False


def _renew_interval() -> float:
    return max(0.05, settings.RESUME_GRACE_SECONDS / 3)
