"""Resuming an answer: who may read a request's events again, and `GET /api/requests/<id>/events`.

Every request's events stay in its Redis Stream (chat.events) for RESUME_KEEP_SECONDS after the
last one, so a client that lost its connection reads them again from any event id: the chat page
over its socket (chat.chat_consumer), API clients here, as server-sent events:

    id: <event id>
    event: <type>          (start, sources, delta, final, error, queued, received: its worker
                           waits for the model to load, `loading_seconds` so far)
    data: <the event as JSON: llmsite.contract.encode, e.g. {"type": "delta", "text": "..."}>

ending after the final (or error) event. `Last-Event-ID` (or `?last_event_id=`) sends only what
came after that event; without it, everything from the start. Each reader counts as a listener
of the generation (its disconnect grace period).
"""

import uuid

from django.http import JsonResponse, StreamingHttpResponse
from django.views.decorators.http import require_GET

from chat import events, in_flight, services
from chat.models import Message, RequestLog
from llmsite import auth, contract
from llmsite.errors import ApiError, InvalidRequest, Unauthorized

ENDED = (RequestLog.Status.OK, RequestLog.Status.ERROR, RequestLog.Status.CANCELLED)


def answer_of(*, user, request_id) -> Message | None:
    """The chat answer of `user` that request `request_id` writes, or None (unknown, someone else's)."""
    try:
        key = uuid.UUID(str(request_id))
    except ValueError:
        return None
    return Message.objects.filter(request_id=key, conversation__user=user, role=Message.Role.ASSISTANT).first()


def ended_row(request_id) -> RequestLog | None:
    """The request's row if it ended (ok, error, cancelled), else None."""
    row = RequestLog.objects.filter(pk=request_id).only("status", "response", "error").first()
    return row if row is not None and row.status in ENDED else None


def worker_of(request_id) -> str:
    """The worker that holds the request, where its row says it runs ("" else)."""
    row = RequestLog.objects.filter(pk=request_id, status=RequestLog.Status.RUNNING).only("worker").first()
    return row.worker if row is not None else ""


def stored_end(request_id) -> RequestLog | None:
    """The row of a request that ended and whose events are no longer kept (a page left streaming
    by a web process that died); None while its events can still be read."""
    row = ended_row(request_id)
    if row is None or events.sync_client().exists(events.channel(row.pk)):
        return None
    return row


async def follow(request_id: str, *, after: str = "0", worker: str = "") -> in_flight.Generation:
    """A listener of the request's events after `after`: the Generation to relay, then close.
    `worker`: the worker that holds it, where its row says (its `start` may come before `after`)."""
    subscription = await events.Subscription(request_id, after=after, listen=True, worker=worker).open()
    return in_flight.Generation(request_id, subscription)


def _readable_row(request) -> RequestLog:
    """The request row the caller may read: by the API token that made it (Authorization), or by
    the site session for the site's own requests; 404 for anyone else's or an unknown id."""
    try:
        key = uuid.UUID(str(request.resolver_match.kwargs["request_id"]))
    except ValueError:
        raise NoSuchRequest() from None
    rows = RequestLog.objects.filter(pk=key)
    if request.headers.get("Authorization"):
        rows = rows.filter(token=auth.authenticate(header=request.headers["Authorization"]))
    elif request.user.is_authenticated:
        rows = rows.filter(user=request.user, token__isnull=True)
    else:
        raise Unauthorized("Missing API token: send it in the Authorization header, or log in.")
    row = rows.only("id", "status", "worker").first()
    if row is None:
        raise NoSuchRequest()
    return row


def _check(request) -> tuple[str, str, str]:
    after = request.headers.get("Last-Event-ID") or request.GET.get("last_event_id") or "0"
    if not events.valid_event_id(after):
        raise InvalidRequest("Last-Event-ID: not an event id of this stream.", param="Last-Event-ID")
    row = _readable_row(request)
    if row.status in ENDED and not events.sync_client().exists(events.channel(row.pk)):
        raise Gone()
    return str(row.pk), after, row.worker if row.status == RequestLog.Status.RUNNING else ""


class NoSuchRequest(ApiError):
    status = 404
    type = "not_found_error"

    def __init__(self):
        super().__init__("No such request.", param="request_id")


class Gone(ApiError):
    status = 410
    type = "invalid_request_error"

    def __init__(self):
        super().__init__("This request ended and its events are no longer kept (RESUME_KEEP_SECONDS).")


def _sse(event_id: str | None, event: contract.Event) -> bytes:
    head = f"id: {event_id}\n" if event_id else ""
    return f"{head}event: {event.type}\ndata: {contract.encode(event)}\n\n".encode()


async def _stream(generation: in_flight.Generation):
    sent = None
    try:
        async for event in generation.events():
            event_id = generation.event_id if generation.event_id != sent else None
            sent = generation.event_id
            yield _sse(event_id, event)
    finally:
        await generation.close()


@require_GET
async def request_events(request, request_id):
    """`GET /api/requests/<id>/events`: the request's events as server-sent events (module doc)."""
    try:
        request.user = await request.auser()
        request_id, after, worker = await services.edge(_check, request=request)
    except ApiError as exc:
        return JsonResponse(exc.body(), status=exc.status)
    generation = await follow(request_id, after=after, worker=worker)
    response = StreamingHttpResponse(_stream(generation), content_type="text/event-stream; charset=utf-8")
    response["Cache-Control"] = "no-cache"
    response["X-Accel-Buffering"] = "no"
    response["X-Request-Id"] = request_id
    return response
