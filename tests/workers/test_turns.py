"""A worker killed mid-answer never says its answers ended. Where no web process streamed them
either, their turns stayed counted as running in the deployment's line (llmsite/admission.py) for
good: their users went behind everybody else's first requests from then on. A worker's sweep ends
the turns of requests whose rows ended or are gone (workers/admission.end_lost_turns);
tests/workers/test_orphans.py shows the stack's worker doing so."""

import uuid

from chat import concurrency, events, lifecycle
from chat.models import Deployment, RequestLog
from llmsite import admission
from workers.admission import end_lost_turns


def runs_of(deployment: str, user) -> int:
    """The answers of `user` the line counts as running."""
    return int(events.sync_client().hget(f"{admission.prefix(deployment)}:runs", admission.user_key(user.pk)) or 0)


def test_the_turns_of_requests_that_ended_without_their_worker_saying_so_are_ended(user, db_user_factory):
    queue = f"turns-{uuid.uuid4().hex[:6]}"  # no worker: this test takes the requests as one would
    deployment = Deployment.objects.create(name=f"turns-{uuid.uuid4().hex[:8]}", model_source="x/y", queue=queue, max_batch_size=8)
    rows = []
    for _ in range(3):
        row = lifecycle.record(
            request_id=uuid.uuid4(), user=user, token=None, deployment=deployment, protocol="http", prompt="Hi", system_prompt="", history=[], params={}
        )
        concurrency.enqueue(deployment=deployment, user_id=user.pk, request_id=str(row.pk), body={})
        rows.append(str(row.pk))
    for request_id in rows:  # a worker took all three, and was killed while they ran
        assert admission.next_request(deployment=deployment.name, running_here=0)[0] == request_id
        assert lifecycle.start(request_id, worker="killed@nowhere", run="its-run")
    failed, deleted, running = rows
    lifecycle.fail(failed, "The model worker killed@nowhere stopped while generating this answer.")  # as the orphan sweep does
    RequestLog.objects.filter(pk=deleted).delete()  # an operator deleted it
    waiting_user = db_user_factory()
    waiting = str(uuid.uuid4())
    concurrency.enqueue(deployment=deployment, user_id=waiting_user.pk, request_id=waiting, body={})
    try:
        assert runs_of(deployment.name, user) == 3
        assert sorted(end_lost_turns([queue])) == sorted([failed, deleted])
        assert admission.started(deployment.name) == [running]  # its worker may still say it ended
        assert runs_of(deployment.name, user) == 1
        assert end_lost_turns([queue]) == []  # each turn ends once
        assert admission.line_moves(deployment.name, everyone=True) == [(waiting, 0, None)]  # the waiting request is untouched
    finally:
        for request_id in (running, waiting):
            admission.done(deployment=deployment.name, request_id=request_id)
        lifecycle.fail(running, "the test is over")
