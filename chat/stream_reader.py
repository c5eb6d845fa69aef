"""One blocking read of Redis for all of a web process's stream readers.

A reader of a request's events used to wait in an XREAD of its own, holding one of the Redis
pool's connections while it waited: redis-py's asyncio pool holds 100, so a web process's 101st
concurrent stream failed at once with "Too many connections", and every stream cost Redis a
client. Here one task per event loop reads the streams of all readers that are waiting in one
XREAD, on a connection of its own, and hands each reader the events after its last id where the
read began at or before that id (a reader that starts behind the read in flight waits for the
next one, so it skips nothing). A reader that starts waiting while that XREAD blocks wakes it (an
entry in the process's wake stream, which the XREAD also reads), so it does not wait out the
read's block.

A reader waits only while its consumer asks for more (`read`), so a client that reads slowly is
read for slowly: it holds back only itself. Events stay in their Redis Stream until they expire,
so a reader that gave up a read (its timeout, a cancel) misses nothing: it asks again from its
last id. A Redis error in the shared read reaches every reader waiting on it; an id that Redis
would refuse fails its own reader before it gets there (`id_parts`).
"""

import asyncio
import contextlib
import copy
import logging
import re
import uuid
import weakref

import redis.asyncio as aioredis
from django.conf import settings

from llmsite import redis_outage

log = logging.getLogger(__name__)

# Events taken from Redis per stream and read. A reader that comes late to a long answer (a second
# tab, a resume, a web process that fell behind under load) would otherwise take the whole stream
# in one reply, and hold all of it in memory at once, however slowly its client reads.
READ_BATCH = 256
# The shared read's longest wait: readers come and go by the wake stream meanwhile. Under redis-py's
# socket timeout (5 s), which would end a longer one with a TimeoutError.
BLOCK_MS = 1000
# Before each read, the task waits this long per waiting reader (at most LINGER_MAX_SECONDS), so
# that events that workers publish one by one gather into one read: a read costs Redis and this
# process in proportion to the streams it names, and would otherwise often bring one event.
LINGER_PER_READER_SECONDS = 10e-6
LINGER_MAX_SECONDS = 0.005
WAKE_KEEP_SECONDS = 3600  # a wake stream outlives its process by this much at most


_ID = re.compile(r"(\d{1,20})(?:-(\d{1,20}))?")
_ID_PART_MAX = 2**64 - 1  # Redis's stream ids are two unsigned 64-bit numbers


def id_parts(event_id) -> tuple[int, int]:
    """A stream id's two numbers ("0": before everything); ValueError for anything Redis would refuse."""
    found = _ID.fullmatch(event_id.decode() if isinstance(event_id, bytes) else str(event_id))
    if found is None:
        raise ValueError(f"not a stream id: {event_id!r}")
    parts = int(found[1]), int(found[2] or 0)
    if max(parts) > _ID_PART_MAX:
        raise ValueError(f"not a stream id: {event_id!r}")
    return parts


class _Wait:
    __slots__ = ("key", "after", "future")

    def __init__(self, key: str, after: tuple[int, int], future: asyncio.Future):
        self.key, self.after, self.future = key, after, future  # after: the id's two numbers, parsed once


class StreamReader:
    """The shared reader of one event loop: `await read(key, after, timeout)`."""

    def __init__(self, redis_url: str, pool: aioredis.Redis):
        self._pool = pool  # short commands: the wake
        self._conn = aioredis.Redis.from_url(redis_url, single_connection_client=True)
        redis_outage.on_the_primary(self._conn.connection_pool)  # (its one connection is made at its first command)
        self._wake_key = f"llmsite:wake:{uuid.uuid4().hex}"
        self._wake_after = "0"
        self._waits: set[_Wait] = set()
        self._arrived = asyncio.Event()
        self._in_flight: dict[str, tuple] | None = None  # what the XREAD that blocks now reads: key → after
        self._woken = False  # whether a reader woke that XREAD already
        self._task: asyncio.Task | None = None
        self._loop = asyncio.get_running_loop()

    async def read(self, key: str, after: str, timeout: float) -> list:
        """The entries of stream `key` after id `after` (at most READ_BATCH), or [] after `timeout`
        seconds without any."""
        wait = _Wait(key, id_parts(after), self._loop.create_future())  # a bad id fails its own reader here
        self._waits.add(wait)
        try:
            async with asyncio.timeout(timeout):
                self._start()
                if not _reads_for(self._in_flight or {}, wait):  # the XREAD that blocks now would not return its events
                    self._arrived.set()
                    await self._wake_once()
                return await wait.future
        except TimeoutError:
            return []
        finally:
            self._waits.discard(wait)

    def _start(self) -> None:
        if self._task is None or self._task.done():
            self._task = self._loop.create_task(self._run(), name="stream-reader")

    async def _wake_once(self) -> None:
        """Wake the XREAD that blocks now, unless a reader did already: one wake gathers everyone
        who came meanwhile. A wake that failed or was cancelled leaves the next reader to wake it."""
        reading = self._in_flight
        if reading is None or self._woken:
            return
        self._woken = True
        try:
            pipe = self._pool.pipeline(transaction=False)
            pipe.xadd(self._wake_key, {"w": b"1"}, maxlen=1, approximate=False)
            pipe.expire(self._wake_key, WAKE_KEEP_SECONDS)  # each time: a Redis restarted meanwhile forgot it
            await pipe.execute()
        except BaseException:
            if self._in_flight is reading:
                self._woken = False
            raise

    async def _run(self) -> None:
        try:
            await self._read_for_everyone()
        finally:  # cancelled (its event loop closing) or broken: the next read starts a new one
            if _readers.get(self._loop) is self:
                del _readers[self._loop]
            with contextlib.suppress(BaseException):
                await asyncio.wait_for(self._conn.aclose(), 1)

    async def _read_for_everyone(self) -> None:
        while True:
            waiting = [wait for wait in self._waits if not wait.future.done()]
            if not waiting:
                self._arrived.clear()
                await self._arrived.wait()
                continue
            # Readers just handed events ask again, and more events arrive, meanwhile.
            await asyncio.sleep(min(LINGER_MAX_SECONDS, LINGER_PER_READER_SECONDS * len(waiting)))
            waiting = [wait for wait in self._waits if not wait.future.done()]
            if not waiting:
                continue
            streams: dict[str, tuple] = {}
            for wait in waiting:
                if wait.key not in streams or wait.after < streams[wait.key]:
                    streams[wait.key] = wait.after
            self._arrived.clear()
            self._in_flight, self._woken = streams, False
            try:
                ids = {key: f"{ms}-{seq}" for key, (ms, seq) in streams.items()}
                found = await self._conn.xread({**ids, self._wake_key: self._wake_after}, count=READ_BATCH, block=BLOCK_MS)
            except Exception as error:  # Redis gone: each waiting reader hears of it, as from its own read
                raise_if_cancelled()
                self._fail(error)
                await asyncio.sleep(0.1)
                continue
            finally:
                self._in_flight = None
            raise_if_cancelled()
            self._hand_out(streams, found or [])

    def _hand_out(self, streams: dict[str, tuple], found: list) -> None:
        """Each waiting reader's entries from what the XREAD of `streams` found: only to a reader the
        read covered (its stream read from the reader's place or before it), so that nobody skips the
        events between its place and where the read began."""
        entries = {_text(key): got for key, got in found}
        wakes = entries.pop(self._wake_key, None)
        if wakes:
            self._wake_after = _text(wakes[-1][0])
        for wait in list(self._waits):
            if wait.future.done() or not _reads_for(streams, wait):
                continue
            mine = [entry for entry in entries.get(wait.key, ()) if _position(entry[0]) > wait.after]
            if mine:
                wait.future.set_result(mine)

    def _fail(self, error: Exception) -> None:
        log.warning("the shared read of %d event streams failed: %s", len(self._waits), error)
        for wait in list(self._waits):
            if not wait.future.done():
                wait.future.set_exception(_own_copy(error))


def raise_if_cancelled() -> None:
    """Raise again a cancel of this task that an await swallowed. redis-py's asyncio client loses
    one now and then when it lands in a command (redis/redis-py#2028; about one in eight of a busy
    XREAD's here), or turns it into a read timeout at the end of a blocking read: a reader that went
    on would keep its generation listened to, and running, after its client left or pressed Stop."""
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError


def _reads_for(streams: dict[str, tuple], wait: _Wait) -> bool:
    """Whether a read of `streams` returns what `wait` waits for: its stream, from its place or before."""
    return wait.key in streams and streams[wait.key] <= wait.after


def _position(entry_id) -> tuple[int, int]:
    """The two numbers of an id Redis gave (always "<ms>-<seq>"; no need to check it as id_parts does)."""
    ms, seq = _text(entry_id).split("-")
    return int(ms), int(seq)


def _own_copy(error: Exception) -> Exception:
    """A reader's own copy of the shared read's error: one object raised in many tasks would gather
    all their tracebacks."""
    try:
        mine = copy.copy(error)
    except Exception:
        return error
    mine.__cause__ = error.__cause__
    return mine


def _text(value) -> str:
    return value.decode() if isinstance(value, bytes) else value


_readers: "weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, StreamReader]" = weakref.WeakKeyDictionary()


def reader(pool: aioredis.Redis) -> StreamReader:
    """This event loop's shared reader (Daphne runs one loop; tests may run several)."""
    loop = asyncio.get_running_loop()
    found = _readers.get(loop)
    if found is None:
        found = _readers[loop] = StreamReader(settings.REDIS_URL, pool)
    return found
