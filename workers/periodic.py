"""A worker's background chores: a daemon thread that runs one every so often."""

import logging
import threading

from django.db import close_old_connections

log = logging.getLogger(__name__)


def every(seconds: float, work, *, name: str, failure: str) -> threading.Thread:
    """A daemon thread that runs `work()` every `seconds`, logging `failure` when it raises (Redis
    or the database away: it runs again next time) and giving back its database connection."""

    def loop():
        while True:
            threading.Event().wait(seconds)
            try:
                work()
            except Exception:
                log.warning(failure, exc_info=True)
            finally:
                close_old_connections()

    thread = threading.Thread(target=loop, name=name, daemon=True)
    thread.start()
    return thread
