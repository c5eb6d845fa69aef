"""Request ends the database could not take (PostgreSQL away as the answer ended).

The client hears the end anyway (workers/services.py `_end`); the row's end is kept here, in the
worker's memory, and stored again every RETRY_SECONDS until the database takes it, so the request
does not stay `running` for good and its tokens reach the usage rollup (quotas, dashboards). Each
store is a conditional transition (chat/lifecycle.py): storing it late changes nothing where the
web tier failed the row meanwhile. Ends still unstored when the worker stops are logged, lost.
"""

import logging
import threading
from collections.abc import Callable

from celery.signals import worker_shutdown
from django.db import Error as DBError

from workers.periodic import every

log = logging.getLogger(__name__)

RETRY_SECONDS = 5.0
LIMIT = 10_000  # ends kept at most; beyond, the oldest is dropped (logged)

_pending: dict[str, Callable[[], object]] = {}  # request id -> its store, oldest first
_lock = threading.Lock()
_retrier: threading.Thread | None = None


def keep(request_id: str, store: Callable[[], object]) -> None:
    """Store `store()` later: the database refused it now."""
    global _retrier
    with _lock:
        if len(_pending) >= LIMIT:
            oldest = next(iter(_pending))
            del _pending[oldest]
            log.error("generation %s: its end is dropped unstored (%d ends wait for the database)", oldest, LIMIT)
        _pending[request_id] = store
        if _retrier is None:
            _retrier = every(RETRY_SECONDS, retry, name="unstored-ends", failure="could not store the kept request ends")


def retry() -> int:
    """Store the kept ends, oldest first, until the database refuses one; how many were stored."""
    with _lock:
        waiting = list(_pending.items())
    stored = 0
    for request_id, store in waiting:
        try:
            store()
        except DBError:
            return stored  # still away: the rest wait for the next round
        except Exception:  # not the database's doing: trying again would fail again
            log.exception("generation %s: its end cannot be stored", request_id)
        else:
            stored += 1
            log.warning("generation %s: its end was stored after the database came back", request_id)
        with _lock:
            _pending.pop(request_id, None)
    return stored


def waiting() -> int:
    with _lock:
        return len(_pending)


@worker_shutdown.connect
def _last_try(**kwargs):
    if not waiting():
        return
    try:
        retry()
    except Exception:
        log.warning("could not store the kept request ends", exc_info=True)
    if left := waiting():
        log.error("%d request ends were never stored: the database stayed away until the worker stopped", left)
