"""Riding out a Redis that is away for a moment: a restart, a failover, a dropped connection.

A started answer's events go on through such a moment: its worker's appends wait for Redis and
try again (`append`), and a web reader of the answer reads on from its last id
(`chat.events.Subscription`). Each waits at most REDIS_OUTAGE_SECONDS from the moment it found
Redis away, then fails as before: the stream ends with an error and never hangs.

An append carries a tag of its own (the entry's field `p`), so a retry whose first try was
carried out (its reply lost with the connection) finds that entry and does not add it again: a
delta appended twice would say its text twice. A Redis that restarted without its data lost the
entry with everything else, and the retry appends it again (a reader that read it in the
instant before sees it twice). The site's clients are made with `from_url`, which gives them no
retries of their own (a `redis.Redis(host=...)` retries up to 10 times by default, and would).
"""

import logging
import os
import time

import redis
from django.conf import settings

log = logging.getLogger(__name__)

# What a Redis that is away raises: refused or dropped connections, a reply that never came,
# a server still loading its data (BusyLoadingError is a ConnectionError).
AWAY = (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError)
# Entries a retry looks through for its own, newest first: only the worker appends a started
# answer's events (the web tier adds a few while it waits in line).
LOOK_BACK = 64
PAUSE_FIRST, PAUSE_MAX = 0.05, 1.0


class Outage:
    """How long Redis has been away as its callers found it: `try_again()` after a failed call
    (False once away for REDIS_OUTAGE_SECONDS), `back()` after one that worked."""

    def __init__(self, what: str = ""):
        self.what = what  # logged as it begins and ends, where named
        self.since: float | None = None

    def try_again(self) -> bool:
        now, since = time.monotonic(), self.since  # (read once: another thread's back() may clear it)
        if since is None:
            since = self.since = now
            if self.what:
                log.warning("Redis is away: %s waits for it for up to %g s", self.what, settings.REDIS_OUTAGE_SECONDS)
        return now - since < settings.REDIS_OUTAGE_SECONDS

    def back(self) -> None:
        if self.since is not None and self.what:
            log.warning("Redis is back for %s after %.1f s", self.what, time.monotonic() - self.since)
        self.since = None


# The process's appends share one: once Redis has been away too long, each append tries once,
# so a generation that failed on it ends (its error event tried too) without waiting again.
appends = Outage("appending events")


def append(client: redis.Redis, key: str, fields: dict, *, maxlen: int, keep_seconds: float) -> None:
    """XADD `fields` to stream `key` (capped at about `maxlen` entries, expiring `keep_seconds`
    after its last) once, waiting for a Redis that is away (see the module's docstring)."""
    tag = os.urandom(8)
    tried, pause = False, PAUSE_FIRST
    while True:
        try:
            pipe = client.pipeline(transaction=False)
            if not (tried and _appended(client, key, tag)):
                pipe.xadd(key, {**fields, "p": tag}, maxlen=maxlen, approximate=True)
            pipe.expire(key, int(keep_seconds))
            pipe.execute()
            appends.back()
            return
        except AWAY:
            if not appends.try_again():
                raise
        tried = True
        time.sleep(pause)
        pause = min(pause * 2, PAUSE_MAX)


def _appended(client: redis.Redis, key: str, tag: bytes) -> bool:
    return any(fields.get(b"p") == tag for _, fields in client.xrevrange(key, count=LOOK_BACK))
