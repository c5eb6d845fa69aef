"""The worker's side of fair turns (llmsite/admission.py): it takes a waiting request only when
its engine has room, so it never holds work another worker could start.

One thread per worker waits for a queued request (its queues' bells) and starts the next ones by
fair order while this worker runs fewer of a deployment's answers than the deployment's
`max_batch_size`; each answer runs on its own thread, and when it ends that thread takes the
next one. Each start and each end tells the waiting requests their new places. A sweep fails
the requests that nobody will start (lost with Redis's data, or taken by a worker that died), and
ends the turns of answers that ended without their worker saying so (it died).
"""

import datetime
import logging
import threading
import time
from collections import Counter

from celery.signals import worker_shutting_down
from django import db
from django.conf import settings
from django.utils import timezone

from chat import concurrency, lifecycle
from chat.models import RequestLog
from llmsite import admission
from workers import orphans, services, unstored
from workers.periodic import every

log = logging.getLogger(__name__)

BELL_TIMEOUT_SECONDS = 0.5  # a worker also looks this often (a bell another worker took)
DRAIN_SECONDS = 20.0  # a worker that stops lets its running answers end for this long (as Celery's warm shutdown did)
LOST = "The request was lost before it started (its waiting line was lost with Redis's data, or the worker that took it stopped): send it again."
REMIND_SECONDS = 10.0  # every waiting request hears its place this often (well within STREAM_TIMEOUT_SECONDS)


class Admitter:
    def __init__(self, queues):
        self.queues = sorted(queues)
        self.running: Counter = Counter()  # deployment -> answers running here
        self.closing = False  # the worker is stopping: it takes nothing more (others will)
        self._lock = threading.Lock()

    def start(self) -> threading.Thread:
        thread = threading.Thread(target=self._loop, name="admission", daemon=True)
        thread.start()
        return thread

    def _loop(self) -> None:
        bells = [admission.bell(queue) for queue in self.queues]
        reminded = time.monotonic()
        while True:
            try:
                remind = time.monotonic() - reminded >= REMIND_SECONDS
                for deployment in admission.deployments_of(self.queues):
                    self.pump(deployment)
                    if remind and admission.has_waiting(deployment):
                        concurrency.announce(deployment, everyone=True)
                if remind:
                    reminded = time.monotonic()
                admission.sync_client().blpop(bells, timeout=BELL_TIMEOUT_SECONDS)
            except Exception:  # Redis away: look again in a moment, never give up
                log.warning("admission: cannot read the waiting lines", exc_info=True)
                time.sleep(1)

    def pump(self, deployment: str) -> None:
        """Start waiting requests of `deployment` while this worker has room for them."""
        started = 0
        with self._lock:
            while not self.closing and (found := admission.next_request(deployment=deployment, running_here=self.running[deployment])):
                self.running[deployment] += 1
                started += 1
                threading.Thread(target=self._run, args=(deployment, *found), name=f"generate-{found[0][:8]}", daemon=True).start()
        if started:
            concurrency.announce(deployment)

    def _run(self, deployment: str, request_id: str, body: dict) -> None:
        began = time.monotonic()
        try:
            services.generate(body)
        except Exception as exc:
            log.exception("generation %s broke", request_id)
            try:  # the client hears the end now, not after the stream's watchdog
                services.end_broken(request_id, exc)
            except Exception:
                log.exception("generation %s: could not report its failure", request_id)
        finally:
            # This thread's database connection back to the pool (Celery did so after each task;
            # a thread per answer that kept its own drained the pool after ~20 answers).
            db.connections.close_all()
            with self._lock:
                self.running[deployment] -= 1
            try:
                admission.done(deployment=deployment, request_id=request_id, seconds=time.monotonic() - began)
                self.pump(deployment)
            except Exception:
                log.warning("admission: could not end %s's turn", request_id, exc_info=True)

    def drain(self, timeout: float) -> None:
        """Wait for the answers running here to end (the waiting ones stay in line for other workers)."""
        deadline = time.monotonic() + timeout
        while sum(self.running.values()) > 0 and time.monotonic() < deadline:
            time.sleep(0.2)


_admitters: list[Admitter] = []


def start(queues) -> Admitter:
    admitter = Admitter(queues)
    admitter.start()
    _admitters.append(admitter)
    every(settings.ORPHAN_SWEEP_SECONDS, lambda: sweep(queues), name="line-sweep", failure="the sweep of the waiting lines failed")
    return admitter


def sweep(queues) -> None:
    """Both mends, each whatever the other met (the database or Redis away: the next sweep tries again)."""
    for mend in (fail_lost, end_lost_turns):
        try:
            mend(queues)
        except Exception:
            log.warning("the line sweep's %s failed", mend.__name__, exc_info=True)


_suspects: set[str] = set()  # the ids the last sweep found queued long and in no line


def fail_lost(queues, suspects: set[str] | None = None) -> list[str]:
    """Fail the requests of this worker's deployments that nobody will start: queued for longer
    than STREAM_TIMEOUT_SECONDS and found waiting in no line by this sweep and by the one before it
    (`suspects`, the ids that one found so, updated in place). The age keeps clear of the moment
    between a request's row and its place in line; the second look, of the moment a request leaves
    its line before its row moves (a worker starting it, its client cancelling it). Redis lost the
    lines (a restart with no persistence, a failover), or the worker that took one died before it
    started it: their rows stayed queued for good (in flight on /metrics, out of the usage). Each
    is counted, and its stream told, for a web process that still reads it or a page that resumes
    it (`orphans.tell_failed`). Returns their ids."""
    suspects = _suspects if suspects is None else suspects
    before = timezone.now() - datetime.timedelta(seconds=settings.STREAM_TIMEOUT_SECONDS)
    rows = RequestLog.objects.filter(status=RequestLog.Status.QUEUED, queued_at__lt=before, deployment__queue__in=queues)
    found = {str(pk): name for pk, name in rows.values_list("pk", "deployment__name")}
    lost = set()
    if found:  # every line of these queues is looked in: a deployment renamed while the request waited
        lost = found.keys() - admission.waiting_among(admission.deployments_of(queues) | set(found.values()), list(found))
    confirmed = lost & suspects
    suspects.clear()
    suspects.update(lost - confirmed)
    failed = []
    for request_id in confirmed:
        if not lifecycle.fail_queued(request_id, LOST):
            continue
        log.warning("request %s was in no waiting line and not started; failed", request_id)
        failed.append(request_id)
        orphans.tell_failed(request_id, found[request_id], LOST)
    return failed


def end_lost_turns(queues) -> list[str]:
    """End the turns of requests that ended without their worker saying so: it was killed
    mid-answer (workers/orphans.py or the web tier failed the row), or died before it started one
    (`fail_lost` failed it). The web process that streams such an answer ends its turn
    (chat.in_flight Generation.close); where none did (it died too, or Redis was away then), its
    user counted one more running answer for good, so that everybody else's requests went ahead of
    theirs. A turn ends here once its request's row has ended or is gone. Returns the ids whose
    turns this call ended."""
    ended = []
    for deployment in admission.deployments_of(queues):
        started = admission.started(deployment)
        if not started:
            continue
        here = [rid for rid in lifecycle.ended_among(started) if admission.done(deployment=deployment, request_id=rid) == 1]  # 0: its worker said so meanwhile
        if here:
            ended += here
            concurrency.announce(deployment)  # fewer running answers for those users: places may improve
    return ended


@worker_shutting_down.connect
def _stop_taking(**kwargs):
    for admitter in _admitters:
        admitter.closing = True


def drain() -> None:
    """The stopping worker's answers end (for up to DRAIN_SECONDS), then its kept ends are stored;
    called by the worker's one shutdown receiver (workers/loader.py), before its engines stop."""
    for admitter in _admitters:
        admitter.drain(DRAIN_SECONDS)
    unstored.last_try()  # ends the database could not take, the drained answers' among them
