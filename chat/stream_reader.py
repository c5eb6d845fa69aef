"""One blocking read of Redis for all of a web process's stream readers.

A reader of a request's events used to wait in an XREAD of its own, holding one of the Redis
pool's connections while it waited: redis-py's asyncio pool holds 100, so a web process's 101st
concurrent stream failed at once with "Too many connections", and every stream cost Redis a
client. Here one task per event loop reads the streams of all readers that are waiting in one
XREAD, on a connection of its own, and hands each reader the events after its last id. A reader
that starts waiting while that XREAD blocks wakes it (an entry in the process's wake stream,
which the XREAD also reads), so it never waits on another reader's timeout.

A reader waits only while its consumer asks for more (`read`), so a client that reads slowly is
read for slowly: it holds back only itself. Events stay in their Redis Stream until they expire,
so a reader that gave up a read (its timeout, a cancel) misses nothing: it asks again from its
last id. A Redis error in the shared read reaches every reader waiting on it.
"""

import asyncio
import logging
import time
import uuid
import weakref

import redis.asyncio as aioredis
from django.conf import settings

log = logging.getLogger(__name__)

# Events taken from Redis per stream and read. A reader that comes late to a long answer (a second
# tab, a resume, a web process that fell behind under load) would otherwise take the whole stream
# in one reply, and hold all of it in memory at once, however slowly its client reads.
READ_BATCH = 256
# The shared read's longest wait: readers come and go by the wake stream meanwhile. Under redis-py's
# socket timeout (5 s), which would end a longer one with a TimeoutError.
BLOCK_MS = 1000
WAKE_KEEP_SECONDS = 3600  # a wake stream outlives its process by this much at most


def id_parts(event_id) -> tuple[int, int]:
    ms, _, seq = str(event_id).partition("-")
    return int(ms), int(seq or 0)


class _Wait:
    __slots__ = ("key", "after", "future")

    def __init__(self, key: str, after: str, future: asyncio.Future):
        self.key, self.after, self.future = key, after, future


class StreamReader:
    """The shared reader of one event loop: `await read(key, after, timeout)`."""

    def __init__(self, redis_url: str, pool: aioredis.Redis):
        self._pool = pool  # short commands: the wake
        self._conn = aioredis.Redis.from_url(redis_url, single_connection_client=True)
        self._wake_key = f"llmsite:wake:{uuid.uuid4().hex}"
        self._wake_after = "0"
        self._waits: set[_Wait] = set()
        self._arrived = asyncio.Event()
        self._in_flight: dict[str, str] | None = None  # what the XREAD that blocks now reads: key → after
        self._woken = False  # whether a reader woke that XREAD already
        self._wake_expires_at = 0.0
        self._task: asyncio.Task | None = None

    async def read(self, key: str, after: str, timeout: float) -> list:
        """The entries of stream `key` after id `after` (at most READ_BATCH), or [] after `timeout`
        seconds without any."""
        wait = _Wait(key, after, asyncio.get_running_loop().create_future())
        self._waits.add(wait)
        try:
            self._start()
            if not self._covered(wait):
                self._arrived.set()
                if self._in_flight is not None and not self._woken:  # one wake per read: it gathers everyone who came meanwhile
                    self._woken = True
                    await self._wake()
            try:
                return await asyncio.wait_for(wait.future, timeout)
            except TimeoutError:
                return []
        finally:
            self._waits.discard(wait)

    def _start(self) -> None:
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._run(), name="stream-reader")

    def _covered(self, wait: _Wait) -> bool:
        """Whether the XREAD that blocks now would return what `wait` waits for."""
        reading = self._in_flight or {}
        return wait.key in reading and id_parts(reading[wait.key]) <= id_parts(wait.after)

    async def _wake(self) -> None:
        if time.monotonic() < self._wake_expires_at:
            await self._pool.xadd(self._wake_key, {"w": b"1"}, maxlen=1, approximate=False)
            return
        pipe = self._pool.pipeline(transaction=False)
        pipe.xadd(self._wake_key, {"w": b"1"}, maxlen=1, approximate=False)
        pipe.expire(self._wake_key, WAKE_KEEP_SECONDS)
        await pipe.execute()
        self._wake_expires_at = time.monotonic() + WAKE_KEEP_SECONDS / 2

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(0)  # readers just handed events ask again first: one read serves them all
            waiting = [wait for wait in self._waits if not wait.future.done()]
            if not waiting:
                self._arrived.clear()
                await self._arrived.wait()
                continue
            streams: dict[str, str] = {}
            for wait in waiting:
                if wait.key not in streams or id_parts(wait.after) < id_parts(streams[wait.key]):
                    streams[wait.key] = wait.after
            self._arrived.clear()
            self._in_flight, self._woken = streams, False
            try:
                found = await self._conn.xread({**streams, self._wake_key: self._wake_after}, count=READ_BATCH, block=BLOCK_MS)
            except Exception as error:  # Redis gone: each waiting reader hears of it, as from its own read
                raise_if_cancelled()
                self._fail(error)
                await asyncio.sleep(0.1)
                continue
            finally:
                self._in_flight = None
            raise_if_cancelled()
            self._hand_out(found or [])

    def _hand_out(self, found: list) -> None:
        entries = {(key.decode() if isinstance(key, bytes) else key): got for key, got in found}
        wakes = entries.pop(self._wake_key, None)
        if wakes:
            last = wakes[-1][0]
            self._wake_after = last.decode() if isinstance(last, bytes) else last
        for wait in list(self._waits):
            after = id_parts(wait.after)
            mine = [entry for entry in entries.get(wait.key, ()) if id_parts(_text(entry[0])) > after]
            if mine and not wait.future.done():
                wait.future.set_result(mine)

    def _fail(self, error: Exception) -> None:
        log.warning("the shared read of %d event streams failed: %s", len(self._waits), error)
        for wait in list(self._waits):
            if not wait.future.done():
                wait.future.set_exception(error)


def raise_if_cancelled() -> None:
    """Raise again a cancel of this task that an await swallowed. redis-py's asyncio client loses
    one now and then when it lands in a command (redis/redis-py#2028; about one in eight of a busy
    XREAD's here), or turns it into a read timeout at the end of a blocking read: a reader that went
    on would keep its generation listened to, and running, after its client left or pressed Stop."""
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError


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
