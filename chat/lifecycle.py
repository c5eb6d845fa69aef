"""The one owner of a request row's state: queued -> running -> ok / cancelled / error.

Both tiers change a `RequestLog` only through these functions. The web tier records a request
(queued), fails it (it could not be queued, its stream went silent) or cancels it while still
queued (the client left); the worker starts it, finishes it and fails it. Each transition is one
conditional UPDATE: a transition the row's status does not allow (a second delivery of a task, a
worker finishing a request the web tier already failed) changes nothing and is logged.
A move to an end state also counts the request in the daily usage rollup (chat/rollup.py), in the
same transaction, so the rollup counts each ended request exactly once.
"""

import logging
import uuid

from django.db import Error as DBError, transaction
from django.utils import timezone

from chat import events, rollup
from chat.models import RequestLog
from llmsite import contract
from llmsite.text import storable

log = logging.getLogger(__name__)

Status = RequestLog.Status
LIVE = (Status.QUEUED, Status.RUNNING)  # not ended yet
ALLOWED_FROM = {
    Status.RUNNING: (Status.QUEUED,),
    Status.OK: (Status.RUNNING,),
    Status.CANCELLED: (Status.QUEUED, Status.RUNNING),
    Status.ERROR: (Status.QUEUED, Status.RUNNING),
}


def record(*, request_id, user, token, deployment, protocol: str, prompt: str, system_prompt: str, history, params: dict) -> RequestLog:
    """A new request, queued."""
    return RequestLog.objects.create(
        id=request_id,
        user=user,
        token=token,
        deployment=deployment,
        protocol=protocol,
        prompt=storable(prompt),
        system_prompt=storable(system_prompt),
        history=storable(history),
        params=storable(params),
    )


def record_done(*, request_id: str, user, token, protocol: str, prompt: str, params: dict, prompt_tokens: int | None, error: str) -> RequestLog:
    """A request answered at once, stored as it ended (an embeddings call: ok, or error)."""
    now = timezone.now()
    with transaction.atomic():
        row = RequestLog.objects.create(
            id=request_id,
            user=user,
            token=token,
            protocol=protocol,
            prompt=storable(prompt),
            params=storable(params),
            prompt_tokens=prompt_tokens,
            status=Status.ERROR if error else Status.OK,
            error=storable(error),
            started_at=now,
            finished_at=now,
        )
        rollup.add(row.id)
    return row


def _move(request_id, to: str, **fields) -> bool:
    """Move the row to `to` if its status allows it; else log the refusal and change nothing."""
    moved = RequestLog.objects.filter(id=request_id, status__in=ALLOWED_FROM[to]).update(status=to, **fields)
    if not moved:
        now = RequestLog.objects.filter(id=request_id).values_list("status", flat=True).first()
        log.warning("request %s: %s -> %s refused", request_id, now or "(no row)", to)
    return bool(moved)


def _end(request_id, to: str, **fields) -> bool:
    """`_move` to an end state, counted in the usage rollup in the same transaction."""
    with transaction.atomic():
        moved = _move(request_id, to, **fields)
        if moved:
            rollup.add(request_id)
    return moved


def start(request_id, *, worker: str, run: str = "") -> bool:
    """A worker takes a queued request, once: a second delivery of its task finds it taken.
    `run` names the worker's process, which a restarted worker of the same name is not."""
    return _move(request_id, Status.RUNNING, started_at=timezone.now(), worker=worker, worker_run=run)


def finish(
    request_id, *, response: str, finish_reason: str, prompt_tokens: int, completion_tokens: int, cached_tokens: int, first_token_at,
    finished_at=None,
) -> bool:
    """A running request ended: ok, or cancelled where the engine stopped it (Stop, client gone);
    `finished_at` (now by default) is when, for an end stored later than it happened."""
    return _end(
        request_id,
        Status.CANCELLED if finish_reason == "cancelled" else Status.OK,
        response=response,
        finish_reason=finish_reason,
        prompt_tokens=prompt_tokens,
        completion_tokens=completion_tokens,
        cached_tokens=cached_tokens,
        first_token_at=first_token_at,
        finished_at=finished_at or timezone.now(),
    )


def fail(request_id, message: str, *, finished_at=None, **fields) -> bool:
    """A queued or running request failed; `fields` keep what it had (the answer so far)."""
    return _end(request_id, Status.ERROR, error=storable(message), finished_at=finished_at or timezone.now(), **fields)


def fail_unanswered(request_id, message: str, said: str = "") -> bool:
    """A request nobody will answer now: its stream the web tier ended itself (silence, a dead
    worker, Redis away too long), or its worker is gone (workers/orphans.py). Its worker is asked
    to stop, and the row fails keeping what the answer had said (`said`, where the caller heard
    it, else read back from the stream); whether it moved. Redis or the database away is
    logged, not raised, so the client still gets its error event (a row a dead worker left running
    is ended by a worker's sweep; a silent worker's by that worker)."""
    try:
        events.request_cancel(request_id)
    except Exception:
        log.warning("request %s: could not ask its worker to stop", request_id, exc_info=True)
    try:
        return fail(request_id, message, response=storable(said) or events.said_so_far(request_id))
    except DBError:  # InterfaceError (a closed connection) as well as DatabaseError
        log.warning("request %s: its row could not be failed", request_id, exc_info=True)
        return False


def cancel_queued(request_id) -> bool:
    """The client left before any worker took the request."""
    return _end_queued(request_id, Status.CANCELLED)


def ended_among(request_ids: list[str]) -> set[str]:
    """Those of `request_ids` whose rows ended or are gone (an id that is no UUID names no row)."""
    ids = [rid for rid in request_ids if _is_uuid(rid)]
    live = RequestLog.objects.filter(pk__in=ids, status__in=LIVE).values_list("pk", flat=True)
    return set(request_ids) - {str(pk) for pk in live}


def _is_uuid(value: str) -> bool:
    try:
        uuid.UUID(value)
    except ValueError:
        return False
    return True


def fail_queued(request_id, message: str) -> bool:
    """A request no worker will start: its client's stream broke while it waited (a worker that
    takes it later finds it ended), or it is in no waiting line (workers/admission.py). Whether it
    moved; the database away is logged, not raised."""
    try:
        return _end_queued(request_id, Status.ERROR, error=storable(message))
    except DBError:
        log.warning("request %s: its row could not be failed", request_id, exc_info=True)
        return False


def _end_queued(request_id, to: str, **fields) -> bool:
    # Only from queued: a running request is ended by its worker (not a refused transition).
    with transaction.atomic():
        moved = RequestLog.objects.filter(id=request_id, status=Status.QUEUED).update(status=to, finished_at=timezone.now(), **fields)
        if moved:
            rollup.add(request_id)
    return bool(moved)


def status_of(request_id) -> str | None:
    return RequestLog.objects.filter(id=request_id).values_list("status", flat=True).first()


LOST_END = "This request ended, but its end was lost with Redis's data, and its row keeps only its first answer's text: send it again."


def end_event(request_id) -> contract.Event | None:
    """The event the request's stream ended with, as its row keeps it (None while it runs, or
    without a row): for a reader whose stream's end Redis lost. The row keeps answer 0's text
    only, without logprobs or the other answers of n > 1: such a request's end is an error."""
    fields = ("status", "response", "error", "finish_reason", "prompt_tokens", "completion_tokens", "cached_tokens", "params")
    row = RequestLog.objects.filter(pk=request_id).only(*fields).first()
    if row is None or row.status in LIVE:
        return None
    if row.status == Status.ERROR:
        return contract.Error(row.error or "The request failed.")
    if (row.params or {}).get("n", 1) != 1 or (row.params or {}).get("logprobs"):
        return contract.Error(LOST_END)
    usage = {"prompt_tokens": row.prompt_tokens or 0, "completion_tokens": row.completion_tokens or 0}
    reason = row.finish_reason or ("cancelled" if row.status == Status.CANCELLED else "stop")
    return contract.Final(text=row.response, finish_reason=reason, usage=usage, cached_tokens=row.cached_tokens or 0)
