"""Request rows a dead worker left running where no web process saw it die (workers/orphans.py):
the stack's worker fails them, and a page reloaded on such an answer is shown that end and stores
it (chat.chat_consumer._end_after_error), so the conversation no longer resumes it at each load.

The suite's workers sweep every 2 s (tests/conftest.py)."""

import datetime
import json
import time
import uuid

import requests
from django.conf import settings
from django.utils import timezone

from chat import events, lifecycle
from chat.models import Deployment, Message, RequestLog
from llmsite import admission, contract
from llmsite.launcher import worker_command
from tests.chat.test_resume import orphaned_answer, resume
from tests.conftest import Process, wait_for_log
from tests.metrics.conftest import copy_of_default, scrape, value, wait_until
from tests.workers.test_turns import queued, runs_of
from workers import orphans
from workers.admission import LOST
from workers.heartbeat import run_of


def beat(worker: str, run: str | None) -> None:
    """A heartbeat key for `worker`, as workers/heartbeat.py writes it (an older worker's names no run)."""
    value = {"pid": 1, "queues": ["nowhere"], **({"run": run} if run is not None else {})}
    events.sync_client().set(events.worker_host_key(worker), json.dumps(value), ex=600)


def left_running(user, worker: str, run: str, **fields) -> RequestLog:
    """An answer whose row `worker` (its process `run`) took a minute ago, and whose web process died since."""
    started = timezone.now() - datetime.timedelta(seconds=60)
    return orphaned_answer(user, status=RequestLog.Status.RUNNING, worker=worker, worker_run=run, started_at=started, **fields)[1]


def taken(deployment: Deployment, user, request_id: str) -> None:
    """The request's turn as a worker that took it from the deployment's line leaves it
    (llmsite/admission.py's _NEXT): counted as running for its user until somebody says it ended.
    Written by hand: put in the line, the stack's worker would take it and answer it."""
    client, line = events.sync_client(), admission.prefix(deployment.name)
    client.sadd(admission.served_key(deployment.queue), deployment.name)
    client.hset(f"{line}:running", request_id, admission.user_key(user.pk))
    client.hincrby(f"{line}:runs", admission.user_key(user.pk), 1)


def name(kind: str) -> str:
    return f"{kind}-{uuid.uuid4().hex[:6]}@nowhere"


def lost(worker: str) -> str:
    return f"The model worker {worker} stopped while generating this answer."


def test_the_rows_of_a_dead_or_restarted_worker_are_failed_and_a_reload_stores_that_end(stack, user):
    ghost, phoenix, upgraded, alive, older = name("ghost"), name("phoenix"), name("upgraded"), name("alive"), name("older")
    beat(phoenix, "the-run-after")  # restarted under its name: beats again, but not as the run that took the row
    beat(upgraded, "the-run-after")  # its row was taken before workers had run ids
    beat(alive, "its-run")
    beat(older, None)
    rows = {worker: left_running(user, worker, run).pk for worker, run in [(phoenix, "a-run"), (upgraded, ""), (alive, "its-run"), (older, "")]}
    ghosts = copy_of_default("ghost")  # the default model on the stack's worker's queue, with series of its own
    rows[ghost] = left_running(user, ghost, "a-run", deployment=ghosts).pk
    taken(ghosts, user, str(rows[ghost]))
    for piece in ("The Louvre ", "is"):  # what the ghost said before it died (its sweep takes a heartbeat TTL)
        events.publish(str(rows[ghost]), contract.Delta(piece))

    def status(worker: str) -> str:
        return RequestLog.objects.get(pk=rows[worker]).status

    try:
        wait_until(lambda: all(status(w) != "running" for w in (ghost, phoenix, upgraded)), "the stack's worker swept the three rows", 120)
        assert status(alive) == status(older) == RequestLog.Status.RUNNING, "a live worker's row was failed"
    finally:
        for worker in (alive, older):
            lifecycle.fail(rows[worker], "the test is over")
    for worker, said in ((ghost, "The Louvre is"), (phoenix, ""), (upgraded, "")):
        row = RequestLog.objects.get(pk=rows[worker])
        assert (row.status, row.error, row.response) == (RequestLog.Status.ERROR, lost(worker), said)  # what it said is kept
        assert row.finished_at is not None
    # Nobody said the ghost's answer ended (no web process streamed it): the stack's worker ends its
    # turn, or its user would count one more running answer for good (workers/admission.end_lost_turns).
    wait_until(lambda: str(rows[ghost]) not in admission.started(ghosts.name), "the ghost's turn ended", 30)
    assert runs_of(ghosts.name, user) == 0
    wait_until(lambda: errors_counted(stack, ghosts) == 1, "the ghost's answer counted as an error on the sweeping worker's /metrics", 30)

    answer = Message.objects.get(request_id=rows[ghost])
    received = resume(stack, user, str(rows[ghost]), "0")
    assert received[-1] == {"type": "done", "message_id": answer.pk, "status": "error", "content": "The Louvre is", "error": lost(ghost)}, received
    answer.refresh_from_db()
    assert (answer.status, answer.error, answer.content) == (Message.Status.ERROR, lost(ghost), "The Louvre is")  # a reload no longer resumes it


def test_a_worker_is_gone_only_once_its_key_stayed_away_a_heartbeat_ttl_over_consecutive_sweeps():
    """A restarted Redis holds no keys until the next beat: one look without the key is not a death,
    nor are two absences with a sweep between them that did not look (it failed part way)."""
    client, worker, absences = events.sync_client(), name("blip"), orphans.Absences()
    ttl, now = settings.WORKER_HEARTBEAT_TTL, time.time()

    def look(at: float) -> bool:
        absences.next_sweep()
        return orphans._gone(client, absences, worker, "a-run", at)

    assert not look(now)
    assert not look(now + ttl - 1)
    assert look(now + ttl)
    beat(worker, "a-run")  # it beat again: the count starts over
    assert not look(now + ttl + 1)
    client.delete(events.worker_host_key(worker))
    assert not look(now + ttl + 2)
    absences.next_sweep()  # a sweep that failed before it looked at this worker
    assert not look(now + 2 * ttl + 3)
    assert look(now + 3 * ttl + 3)


def test_a_workers_rows_name_the_run_its_heartbeat_names(stack, token):
    """What the sweep compares: the run on a row the stack's worker took, and the one its key names."""
    response = requests.post(stack.predict_url(), headers={"Authorization": token}, json={"prompt": "Hi", "max_new_tokens": 1}, timeout=120)
    assert response.status_code == 200, response.text
    row = RequestLog.objects.get(pk=response.headers["X-Request-Id"])
    beating = events.sync_client().get(events.worker_host_key(row.worker))
    assert len(row.worker_run) == 32 and run_of(beating) == row.worker_run


def test_two_live_worker_processes_under_one_name_log_an_error():
    """Each would take the other's rows for a dead process's: the operator is told, in the logs."""
    queue = f"twins-{uuid.uuid4().hex[:6]}"  # no deployment uses it: nothing to load
    twins = [Process(f"worker-{queue}-{n}", worker_command([queue], hostname=f"{queue}@%h")).start() for n in "ab"]
    try:
        for twin in twins:
            wait_for_log(twin, " ready.")
        told = lambda: any(f"another worker process beats as {queue}@" in t.log_path.read_text(errors="replace") for t in twins)  # noqa: E731
        wait_until(told, "a twin logged the other", 60)
    finally:
        for twin in twins:
            twin.stop()


def test_the_stacks_worker_fails_a_request_its_line_lost(stack, user):
    """Redis lost the line it waited in (workers/admission.fail_lost; tests/workers/test_turns.py has the cases kept)."""
    deployment = copy_of_default("lost")
    lost = queued(user, deployment, since=settings.STREAM_TIMEOUT_SECONDS + 60, line="")
    wait_until(lambda: RequestLog.objects.get(pk=lost).status == RequestLog.Status.ERROR, "the stack's worker failed it", 30)
    assert RequestLog.objects.get(pk=lost).error == LOST
    wait_until(lambda: errors_counted(stack, deployment) == 1, "the lost request counted as an error", 30)


def errors_counted(stack, deployment: Deployment) -> float:
    return value(scrape(stack.worker_metrics_url), "llmsite:requests_total", deployment=deployment.name, outcome="error")
