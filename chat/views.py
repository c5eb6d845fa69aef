"""The predict API over HTTP (PROTOCOL.md) and the health endpoints."""

from django.conf import settings
from django.core.exceptions import RequestDataTooBig
from django.http import JsonResponse, StreamingHttpResponse
from django.views.decorators.csrf import csrf_exempt

from chat import services
from chat.formatters.predict import PredictAnswer, PredictStream
from chat.generation import Conversation
from chat.protocols import predict as wire
from chat.relay import first, relay
from llmsite import auth, metrics
from llmsite.errors import ApiError, BodyTooLarge, MethodNotAllowed, ServerError, concerning


def _error(exc: ApiError) -> JsonResponse:
    response = JsonResponse(exc.body(), status=exc.status)
    if getattr(exc, "retry_after", None):
        response["Retry-After"] = str(exc.retry_after)
    return response


def _read_body(request) -> bytes:
    limit = settings.PREDICT_MAX_BODY_BYTES
    try:
        if int(request.META.get("CONTENT_LENGTH") or 0) > limit:
            raise BodyTooLarge(limit)
    except ValueError:
        pass
    try:
        body = request.body
    except RequestDataTooBig:
        raise BodyTooLarge(limit) from None
    if len(body) > limit:
        raise BodyTooLarge(limit)
    return body


def _admit(request, deployment: str):
    """Who calls, may they use the deployment, what do they ask: one trip into sync code."""
    token = auth.authenticate(header=request.headers.get("Authorization"))
    target = services.access_deployment(token=token, name=deployment)
    with concerning(target.name):
        fields = wire.parse_http_body(_read_body(request), request.content_type or "")
    conversation = Conversation(prompt=fields.prompt or "", system_prompt=fields.system_prompt or "", history=fields.pairs() or [])
    prepared = services.prepare(token=token, deployment=target, conversation=conversation, fields=fields, protocol="http")
    return fields, prepared


@csrf_exempt
async def predict(request, deployment: str):
    """`POST /api/predict/<deployment>`: plain-text or JSON body; JSON answer or NUL-delimited stream."""
    try:
        if request.method != "POST":
            raise MethodNotAllowed(request.method)
        fields, prepared = await services.edge(_admit, request=request, deployment=deployment)
        generation = await services.dispatch(prepared)
    except ApiError as exc:
        metrics.refused(exc)
        return _error(exc)

    wire_args = {"history": prepared.conversation.history, "prompt": prepared.conversation.prompt}
    response = await _answer(generation, fields, wire_args)
    response["X-Request-Id"] = generation.request_id  # what a client resumes (/api/requests/<id>/events)
    return response


async def _answer(generation, fields, wire_args):
    if fields.use_stream_chat:
        stream = relay(generation, PredictStream(**wire_args))
        return StreamingHttpResponse(stream, content_type="text/plain; charset=utf-8")
    answer = await first(generation, PredictAnswer(**wire_args, with_sources=bool(fields.langchain)))
    if isinstance(answer, dict):
        return JsonResponse(answer, json_dumps_params={"ensure_ascii": False})
    return _error(answer if isinstance(answer, ApiError) else ServerError("The stream ended without an answer."))


def health(request):
    """Liveness of the web process itself (no database, Redis or worker involved)."""
    return JsonResponse({"status": "ok"})


def _deployments_of(*, token) -> list:
    from chat.selectors import deployments_for

    return list(deployments_for(token=token))


async def deployments_health(request):
    """`GET /api/health`: per deployment the token may use, is a worker alive, and does it really
    generate (a one-token request through the normal path, stored with protocol "check")."""
    from chat import events, probes

    try:
        token = await services.edge(auth.authenticate, header=request.headers.get("Authorization"))
        deployments = await services.edge(_deployments_of, token=token)
    except ApiError as exc:
        return _error(exc)
    checks = await probes.deployments_check(
        deployments=deployments, user=token.user, timeout=settings.HEALTH_PROBE_TIMEOUT_SECONDS
    )
    report = [
        {"deployment": d.name, "worker": await events.queue_has_worker(d.queue), "generates": ok, "detail": text}
        for d, (ok, text) in zip(deployments, checks)
    ]
    healthy = all(r["generates"] for r in report)
    return JsonResponse({"status": "ok" if healthy else "degraded", "deployments": report}, status=200 if healthy else 503)
