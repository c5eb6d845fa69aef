"""What a worker's sweep of its deployments' waiting lines (llmsite/admission.py) mends.

A worker killed mid-answer never says its answers ended. Where no web process streamed them
either, their turns stayed counted as running for good: their users went behind everybody else's
first requests from then on. The sweep ends the turns of requests whose rows ended or are gone
(workers/admission.end_lost_turns); tests/workers/test_orphans.py shows the stack's worker doing so.

A Redis that lost its data (no persistence, a failover) lost the lines: their requests' rows
stayed queued for good. The sweep fails those in no line (workers/admission.fail_lost)."""

import datetime
import uuid

from django.conf import settings
from django.utils import timezone

from chat import concurrency, events, lifecycle
from chat.models import Deployment, RequestLog
from llmsite import admission, contract
from workers.admission import LOST, end_lost_turns, fail_lost


def a_deployment() -> Deployment:
    queue = f"turns-{uuid.uuid4().hex[:6]}"  # no worker: each test takes the requests as one would
    return Deployment.objects.create(name=f"turns-{uuid.uuid4().hex[:8]}", model_source="x/y", queue=queue, max_batch_size=8)


def queued(user, deployment: Deployment, *, since: float = 0, line: str | None = None) -> str:
    """A request row queued `since` seconds ago, waiting in the line of `line` (its deployment's
    by default; "" for none)."""
    row = lifecycle.record(
        request_id=uuid.uuid4(), user=user, token=None, deployment=deployment, protocol="http", prompt="Hi", system_prompt="", history=[], params={}
    )
    RequestLog.objects.filter(pk=row.pk).update(queued_at=timezone.now() - datetime.timedelta(seconds=since))
    line = deployment.name if line is None else line
    if line:
        assert admission.enqueue(
            deployment=line, queue=deployment.queue, user=admission.user_key(user.pk), request_id=str(row.pk), body={}, max_waiting=8, capacity=8
        )
    return str(row.pk)


def runs_of(deployment: str, user) -> int:
    """The answers of `user` the line counts as running."""
    return int(events.sync_client().hget(f"{admission.prefix(deployment)}:runs", admission.user_key(user.pk)) or 0)


def test_the_turns_of_requests_that_ended_without_their_worker_saying_so_are_ended(user, db_user_factory):
    deployment = a_deployment()
    queue = deployment.queue
    rows = [queued(user, deployment) for _ in range(3)]
    for request_id in rows:  # a worker took all three, and was killed while they ran
        assert admission.next_request(deployment=deployment.name, running_here=0)[0] == request_id
        assert lifecycle.start(request_id, worker="killed@nowhere", run="its-run")
    failed, deleted, running = rows
    lifecycle.fail(failed, "The model worker killed@nowhere stopped while generating this answer.")  # as the orphan sweep does
    RequestLog.objects.filter(pk=deleted).delete()  # an operator deleted it
    events.sync_client().hset(f"{admission.prefix(deployment.name)}:running", "not-a-request-id", admission.user_key(user.pk))  # no code writes one
    events.sync_client().hincrby(f"{admission.prefix(deployment.name)}:runs", admission.user_key(user.pk), 1)
    waiting_user = db_user_factory()
    waiting = str(uuid.uuid4())
    concurrency.enqueue(deployment=deployment, user_id=waiting_user.pk, request_id=waiting, body={})
    try:
        assert runs_of(deployment.name, user) == 4
        assert sorted(end_lost_turns([queue])) == sorted([failed, deleted, "not-a-request-id"])
        assert admission.started(deployment.name) == [running]  # its worker may still say it ended
        assert runs_of(deployment.name, user) == 1
        assert end_lost_turns([queue]) == []  # each turn ends once
        assert admission.line_moves(deployment.name, everyone=True) == [(waiting, 0, None)]  # the waiting request is untouched
    finally:
        for request_id in (running, waiting):
            admission.done(deployment=deployment.name, request_id=request_id)
        lifecycle.fail(running, "the test is over")


def test_a_request_queued_long_ago_and_found_in_no_line_twice_is_failed_and_its_stream_told(user):
    """Lost with Redis's data, or taken by a worker that died before it started it; but a request
    found out of line once may be starting, or leaving its line as its client cancels it."""
    deployment, old = a_deployment(), settings.STREAM_TIMEOUT_SECONDS + 60
    lost = queued(user, deployment, since=old, line="")
    fresh = queued(user, deployment, line="")  # its web process puts it in line right after recording it
    taken, starting = queued(user, deployment, since=old), queued(user, deployment, since=old)
    for request_id in (taken, starting):
        assert admission.next_request(deployment=deployment.name, running_here=0)[0] == request_id
    waiting = queued(user, deployment, since=old)  # a long wait in line is no loss
    renamed = queued(user, deployment, since=old, line=f"{deployment.name}-before")  # the deployment was renamed as it waited
    suspects = set()
    try:
        assert fail_lost([deployment.queue], suspects) == []  # found out of line once: not yet
        assert suspects == {lost, taken, starting}
        assert lifecycle.start(starting, worker="w@nowhere", run="its-run")  # it was starting
        assert sorted(fail_lost([deployment.queue], suspects)) == sorted([lost, taken])
        assert fail_lost([deployment.queue], suspects) == [] and suspects == set()
        statuses = {str(pk): status for pk, status in RequestLog.objects.filter(deployment=deployment).values_list("pk", "status")}
        assert statuses == {lost: "error", taken: "error", fresh: "queued", starting: "running", waiting: "queued", renamed: "queued"}
        assert RequestLog.objects.get(pk=lost).error == LOST
        (_, fields), = events.sync_client().xrange(events.channel(lost))
        assert contract.decode(fields[b"e"]) == contract.Error(LOST)  # a page that resumes it hears the end
        assert end_lost_turns([deployment.queue]) == [taken]  # the dead worker's turn
    finally:
        for line, request_id in ((deployment.name, waiting), (deployment.name, starting), (f"{deployment.name}-before", renamed)):
            admission.done(deployment=line, request_id=request_id)
        lifecycle.fail(starting, "the test is over")
        RequestLog.objects.filter(deployment=deployment, status="queued").update(status="cancelled")
