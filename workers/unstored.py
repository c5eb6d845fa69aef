"""Request ends the database could not take because it was away (PostgreSQL stopped or
unreachable as the answer ended).

The client hears the end anyway (workers/services.py `_end`); the row's end, with the time it
happened, is kept here, in the worker's memory, and stored again every RETRY_SECONDS until the
database takes it, so the request does not stay `running` for good and its tokens reach the usage
rollup (quotas, dashboards). Each store is a conditional transition (chat/lifecycle.py): where the
web tier failed the row meanwhile, storing it late changes nothing (logged). Only a database that
is away is waited for: any other refusal (bad data, a schema being migrated) is logged and the
end dropped, as it would fail again. Kept ends are lost with the worker's process: those left as
it stops (after its running answers drained, `last_try`) are logged; a killed worker logs nothing.
"""

import logging
import threading
from collections.abc import Callable

from django.db import InterfaceError, OperationalError

from workers.periodic import every

log = logging.getLogger(__name__)

RETRY_SECONDS = 5.0
LIMIT = 10_000  # ends kept at most; beyond, the oldest is dropped (logged)
AWAY = (OperationalError, InterfaceError)  # the database is away (or the connection to it broke)

_pending: dict[str, Callable[[], bool]] = {}  # request id -> its store, oldest first
_lock = threading.Lock()
_retrier: threading.Thread | None = None


def keep(request_id: str, store: Callable[[], bool], exc: Exception) -> bool:
    """Keep `store` (it returns whether the row moved) to run again once the database is back,
    where `exc` says the database is away; whether it was kept. A request's first end is the one
    kept (a failure while reporting a finished answer does not replace it)."""
    global _retrier
    if not isinstance(exc, AWAY):
        return False
    with _lock:
        if request_id in _pending:
            return True
        if len(_pending) >= LIMIT:
            oldest = next(iter(_pending))
            del _pending[oldest]
            log.error("generation %s: its end is dropped unstored (%d ends wait for the database)", oldest, LIMIT)
        _pending[request_id] = store
        if _retrier is None:
            _retrier = every(RETRY_SECONDS, retry, name="unstored-ends", failure="could not store the kept request ends")
    return True


def retry() -> int:
    """Store the kept ends, oldest first, until the database turns one away; how many were tried
    (stored, or refused by the row's status)."""
    with _lock:
        waiting = list(_pending.items())
    tried = 0
    for request_id, store in waiting:
        try:
            moved = store()
        except AWAY:
            return tried  # still away: this one and the rest wait for the next round
        except Exception:  # not the database being away: it would fail again
            log.exception("generation %s: its end cannot be stored; dropped", request_id)
        else:
            if moved:
                log.warning("generation %s: its end was stored after the database came back", request_id)
            else:  # the web tier ended the row meanwhile (lifecycle logged the refused move)
                log.warning("generation %s: the database is back but the row had already ended; its end is dropped", request_id)
        tried += 1
        with _lock:
            _pending.pop(request_id, None)
    return tried


def waiting() -> int:
    with _lock:
        return len(_pending)


def last_try() -> None:
    """As the worker stops, after its running answers drained: one more try, then say what is lost."""
    if not waiting():
        return
    try:
        retry()
    except Exception:
        log.warning("could not store the kept request ends", exc_info=True)
    if left := waiting():
        log.error("%d request ends were never stored: the database stayed away until the worker stopped", left)
