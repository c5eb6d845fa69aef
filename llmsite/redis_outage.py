"""Riding out a Redis that is away for a moment: a restart, a dropped connection.

A started answer's events go on through such a moment: its worker's appends wait for Redis and
try again (`append`), and a web reader of the answer reads on from its last id
(`chat.events.Subscription`). Each gives up once Redis has been away for REDIS_OUTAGE_SECONDS
(a worker counts from the first append of its process that found it away, a reader from its own
first failed read), and fails as before: the stream ends with an error and never hangs. Other
appends (a place in line, an error a sweep tells) try once, so that no sweep, line or web request
waits on a Redis that is away.

An append carries a tag of its own (the entry's field `p`), so a retry whose first try was
carried out (its reply lost with the connection) finds that entry and does not add it again: a
delta appended twice would say its text twice. Where the look cannot tell (a Redis that restarted
without its data lost the entry, after a reader read it), readers skip a tag they have just seen
(`Tags`). The site's clients are made with `from_url`, which gives them no retries of their own
(a `redis.Redis(host=...)` retries up to 10 times by default, and would append twice).

A failover is such a moment too. The replica becomes the primary, and the site's address (a DNS
name, a proxy) leads to it for connections made after; those made before stay on the old primary,
now a replica, which refuses writes (READONLY) and ends blocked commands that write (UNBLOCKED).
The site's clients' pools are given a connection class (`on_the_primary`) whose connections take
such an answer for Redis away (`FailedOver`, a ConnectionError: callers ride it out as any) and
drop their connection; once a process met one, each of its connections made before reconnects
before its next command, and for REDIS_OUTAGE_SECONDS a missing heartbeat tells nothing of its
worker (`failed_over_lately`).
"""

import collections
import functools
import logging
import os
import threading
import time

import redis
import redis.asyncio
from django.conf import settings

log = logging.getLogger(__name__)

# What a Redis that is away raises: refused or dropped connections, a reply that never came,
# a server still loading its data (BusyLoadingError is a ConnectionError), one that is no longer
# the primary (FailedOver, below).
AWAY = (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError)
# Entries a retry looks through for its own, newest first: only the worker appends a started
# answer's events (the web tier adds a few while it waits in line).
LOOK_BACK = 64
PAUSE_FIRST, PAUSE_MAX = 0.05, 1.0
# A try begun this long after the last failure that anybody saw starts a new outage: callers that
# wait try again at least every PAUSE_MAX, so a quiet spell means Redis was back meanwhile.
QUIET_SECONDS = 3 * PAUSE_MAX


class Outage:
    """How long Redis has been away as its callers found it: `try_again()` after a failed call
    (False once away for REDIS_OUTAGE_SECONDS), `back()` after one that worked. Thread-safe."""

    def __init__(self, what: str = ""):
        self.what = what  # logged as it begins and ends, where named
        self.since: float | None = None
        self.last_failed = 0.0
        self._lock = threading.Lock()

    def try_again(self, began: float | None = None) -> bool:
        """`began`: when the failed try began (a try that hung for long is no quiet spell)."""
        now = time.monotonic()
        began = now if began is None else began
        with self._lock:
            if self.since is None or began - self.last_failed > QUIET_SECONDS:
                self.since = began
                if self.what:
                    log.warning("Redis is away: %s waits for it for up to %g s", self.what, settings.REDIS_OUTAGE_SECONDS)
            self.last_failed = now
            return now - self.since < settings.REDIS_OUTAGE_SECONDS

    def back(self) -> None:
        if self.since is None:  # (every append calls it: no lock where there is nothing to clear)
            return
        with self._lock:
            since, self.since = self.since, None
        if since is not None and self.what:
            log.warning("Redis is back for %s after %.1f s", self.what, time.monotonic() - since)


# The process's appends share one: once Redis has been away too long, each append tries once,
# so a generation that failed on it ends (its error event tried too) without waiting again.
appends = Outage("appending events")


def append(client: redis.Redis, key: str, fields: dict, *, maxlen: int, keep_seconds: float, ride_out: bool = True) -> None:
    """XADD `fields` to stream `key` (capped at about `maxlen` entries, expiring `keep_seconds`
    after its last) once, waiting for a Redis that is away where `ride_out` (module doc)."""
    tag = os.urandom(8)
    tried, pause = False, PAUSE_FIRST
    while True:
        began = time.monotonic()
        try:
            pipe = client.pipeline(transaction=False)
            if not (tried and _appended(client, key, tag)):
                pipe.xadd(key, {**fields, "p": tag}, maxlen=maxlen, approximate=True)
            pipe.expire(key, int(keep_seconds))
            pipe.execute()
            appends.back()
            return
        except AWAY:
            if not ride_out or not appends.try_again(began):
                raise
        tried = True
        time.sleep(pause)
        pause = min(pause * 2, PAUSE_MAX)


def _appended(client: redis.Redis, key: str, tag: bytes) -> bool:
    return any(fields.get(b"p") == tag for _, fields in client.xrevrange(key, count=LOOK_BACK))


class Tags:
    """The tags of the last LOOK_BACK entries a reader took: an entry whose tag is among them is
    one appended twice (module doc), which the reader skips."""

    def __init__(self):
        self._recent: collections.deque = collections.deque(maxlen=LOOK_BACK)

    def seen(self, fields: dict) -> bool:
        tag = fields.get(b"p")
        if tag is None:  # an entry that names none (written before tags)
            return False
        if tag in self._recent:
            return True
        self._recent.append(tag)
        return False


LOG_EVERY_SECONDS = 5.0


class FailedOver(redis.exceptions.ConnectionError):
    """A Redis that is no longer the primary answered (module doc): a write refused (READONLY, also
    as Redis 6 wraps it in a script's error), a blocked command that writes (BRPOP, XREADGROUP)
    ended as it became a replica (UNBLOCKED), a replica cut off from its primary (MASTERDOWN).
    Refused, so carried out nothing: it may be tried again at once (`again_if_failed_over`)."""


def _failed_over(error: redis.exceptions.ResponseError) -> bool:
    text = str(error)
    return (
        isinstance(error, (redis.exceptions.ReadOnlyError, redis.exceptions.MasterDownError))
        or "-READONLY " in text
        or (text.startswith("UNBLOCKED") and "instance state changed" in text)
    )


class _Failovers:
    """When this process's connections last met a Redis that is no longer the primary, and when
    that spell began (a spell ends REDIS_OUTAGE_SECONDS after the last)."""

    met_at = began_at = -float("inf")
    logged_at = -LOG_EVERY_SECONDS


def failed_over_lately() -> bool:
    """Whether a connection of this process met a Redis that is no longer the primary within the
    last REDIS_OUTAGE_SECONDS. Until the site's address leads to the new primary, workers' beats
    do not reach it either: a beat missing meanwhile tells nothing of its worker. For a heartbeat's
    TTL past REDIS_OUTAGE_SECONDS at most, however long the spell lasts (an address that never
    leads on), so that a worker that died meanwhile is found so."""
    now = time.monotonic()
    return (
        now - _Failovers.met_at < settings.REDIS_OUTAGE_SECONDS
        and now - _Failovers.began_at < settings.REDIS_OUTAGE_SECONDS + settings.WORKER_HEARTBEAT_TTL
    )


def again_if_failed_over(call):
    """`call()`, made once more where a Redis that is no longer the primary refused it: the first
    write after a failover is refused, and the process's connections reconnect meanwhile."""
    try:
        return call()
    except FailedOver:
        return call()


def _made_before_a_failover(connection) -> bool:
    """Whether `connection` connected before a connection of this process last met a failover (one
    made after may reach the old primary too, while the address still leads there: it reconnects
    once another met it after, and never loops, as each new connection is newer than that)."""
    return getattr(connection, "_connected_at", _Failovers.met_at) < _Failovers.met_at


def _failover(error: redis.exceptions.ResponseError) -> FailedOver:
    now = time.monotonic()
    if now - _Failovers.met_at >= settings.REDIS_OUTAGE_SECONDS:
        _Failovers.began_at = now
    _Failovers.met_at = now
    if now - _Failovers.logged_at >= LOG_EVERY_SECONDS:  # (each connection meets it, until the address leads on)
        _Failovers.logged_at = now
        log.warning("Redis is no longer the primary (%s): the process's connections reconnect", error)
    return FailedOver(f"Redis is no longer the primary: {error}")


@functools.cache
def _on_the_primary(base: type, reconnect_first: bool) -> type:
    class OnThePrimary(base):
        def _connect(self):
            self._connected_at = time.monotonic()
            return super()._connect()

        def send_packed_command(self, *args, **kwargs):
            if reconnect_first and self._sock is not None and _made_before_a_failover(self):
                self.disconnect()
            return super().send_packed_command(*args, **kwargs)

        def read_response(self, *args, **kwargs):
            try:
                return super().read_response(*args, **kwargs)
            except redis.exceptions.ResponseError as error:
                if not _failed_over(error):
                    raise
                self.disconnect()  # (its other replies, where it sent several, unread)
                raise _failover(error) from error

    return OnThePrimary


@functools.cache
def _on_the_primary_async(base: type) -> type:
    class OnThePrimary(base):
        async def _connect(self):
            self._connected_at = time.monotonic()
            return await super()._connect()

        async def send_packed_command(self, *args, **kwargs):
            if self.is_connected and _made_before_a_failover(self):
                await self.disconnect(nowait=True)  # (an old primary that went silent is not waited for)
            return await super().send_packed_command(*args, **kwargs)

        async def read_response(self, *args, **kwargs):
            try:
                return await super().read_response(*args, **kwargs)
            except redis.exceptions.ResponseError as error:
                if not _failed_over(error):
                    raise
                await self.disconnect(nowait=True)
                raise _failover(error) from error

    return OnThePrimary


def on_the_primary(pool, reconnect_first: bool = True):
    """`pool` (redis-py's, sync or asyncio, before it made a connection), its connections of a class
    that takes a Redis that is no longer the primary for one that is away (module doc): the class
    its URL gave (TLS, a Unix socket), so set here rather than passed to `from_url` (redis-py's
    asyncio `from_url` lets the URL's class win). `reconnect_first=False`: no reconnect before a
    command for another connection's failover (kombu's connections, whose sockets it watches:
    llmsite.broker)."""
    pool.connection_class = connection_class(pool.connection_class, reconnect_first)
    return pool


def connection_class(base: type, reconnect_first: bool = True) -> type:
    """`base` (a redis-py connection class, sync or asyncio) as `on_the_primary` makes it."""
    if issubclass(base, redis.asyncio.connection.AbstractConnection):
        return _on_the_primary_async(base)  # (redis-py's asyncio clients: always reconnect first)
    return _on_the_primary(base, reconnect_first)
