"""Request rows left `running` by a worker that died while nobody watched its stream.

A web process that streams an answer fails its row as soon as the answer's worker stops beating
(chat.events.Subscription). Where that web process died too (a machine restarted, both killed),
nothing did: the row stayed `running` (in flight on /metrics, out of the usage rollup) until a
page resumed the answer, and for good where none would (an API request). Every worker looks every
ORPHAN_SWEEP_SECONDS for running rows whose worker is gone and fails them (counted in the usage
like any other end, and as an error on the sweeping worker's /metrics: `tell_failed`, which the
line sweep of workers/admission.py shares), with an error event in the request's stream for
whoever resumes it.

A worker is gone when its heartbeat key (workers/heartbeat.py) was found away by consecutive
sweeps at least WORKER_HEARTBEAT_TTL seconds apart (not one look: a restarted Redis holds no keys
until the next beat; the key is looked at, not watched, so a key back between two looks is not
seen; and none while this process met a failover lately, whose beats may not reach the new
primary yet: llmsite.redis_outage), or at once when the key names another run than the row does
(a worker restarted under its name beats for it again, but never ran that request).
"""

import logging
import time

from django.conf import settings

from chat import events, lifecycle
from chat.models import RequestLog
from llmsite import contract, redis_outage
from workers import metrics
from workers.heartbeat import run_of
from workers.periodic import every

log = logging.getLogger(__name__)


class Absences:
    """How long each worker's heartbeat key has been away, counted over consecutive sweeps only:
    a sweep that did not look at a worker (it failed part way) starts that worker's count over."""

    def __init__(self):
        self.sweep = 0
        self.away: dict[str, tuple[float, int]] = {}  # worker -> (first found away, the last sweep that found it so)

    def next_sweep(self) -> None:
        self.sweep += 1
        self.away = {worker: seen for worker, seen in self.away.items() if seen[1] == self.sweep - 1}

    def away_for(self, worker: str, now: float) -> float:
        """Seconds since the key was first found away, this look included."""
        first, _ = self.away.get(worker, (now, self.sweep))
        self.away[worker] = (first, self.sweep)
        return now - first

    def back(self, worker: str) -> None:
        self.away.pop(worker, None)


_absences = Absences()


def _gone(client, absences: Absences, worker: str, run: str, now: float) -> bool:
    beat = client.get(events.worker_host_key(worker))
    if beat is None:
        return absences.away_for(worker, now) >= settings.WORKER_HEARTBEAT_TTL
    absences.back(worker)
    beating = run_of(beat)
    # A beat of an older worker names no run: its rows are kept. A row that names none, under a beat
    # that names one, was taken by a worker from before run ids, which is gone.
    return bool(beating and beating != run)


def fail_orphaned(absences: Absences = _absences) -> list[str]:
    """Fail every running row whose worker is gone (module doc); returns their ids."""
    if redis_outage.failed_over_lately():  # beats may not reach the new primary yet: no absence counts
        absences.away.clear()
        return []
    client = events.sync_client()
    absences.next_sweep()
    now = time.monotonic()
    rows = RequestLog.objects.filter(status=RequestLog.Status.RUNNING, started_at__isnull=False).exclude(worker="")
    failed = []
    for request_id, worker, run, deployment in rows.values_list("pk", "worker", "worker_run", "deployment__name"):
        if not _gone(client, absences, worker, run, now):
            continue
        message = events.worker_lost(worker)
        if not lifecycle.fail_unanswered(request_id, message):  # refused (and logged): another worker's sweep was first
            continue
        log.warning("request %s: its worker %s is gone; the row was running, now error", request_id, worker)
        failed.append(str(request_id))
        tell_failed(request_id, deployment, message)
    return failed


def tell_failed(request_id, deployment: str | None, message: str) -> None:
    """A request a sweep failed: counted as an error on this worker's /metrics (its own worker is
    gone or never started it; only the sweep that moved the row counts it), and its stream told,
    so that a page resuming it hears the end now (a web process still reading it ends on that
    event, and counts nothing)."""
    metrics.count(deployment=deployment or "", outcome="error")
    try:
        events.publish(request_id, contract.Error(message), ride_out=False)
    except Exception:  # Redis away: a resume finds the ended row instead
        log.warning("could not publish the end of request %s", request_id, exc_info=True)


def start_sweeper():
    return every(settings.ORPHAN_SWEEP_SECONDS, fail_orphaned, name="orphan-sweep", failure="the sweep of orphaned request rows failed")
