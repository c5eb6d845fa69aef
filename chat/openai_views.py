"""The OpenAI-compatible API (`/v1/...`): thin async views over the same services as predict."""

import dataclasses

from django.conf import settings
from django.http import HttpResponse, StreamingHttpResponse
from ninja import Router
from ninja.security import APIKeyHeader
from ninja.streaming import SSE

from chat import embeddings, quotas, ratelimits, selectors, services, tools
from chat.decoding import check_decoding
from chat.formatters.openai import ChatShape, CompletionShape, OpenAIStream
from chat.formatters.tool_calls import ToolCallStream, whole_answer
from chat.protocols import openai as wire
from chat.relay import first, relay
from llmsite import auth
from llmsite.errors import ApiError, InvalidRequest, ServerError

ERRORS = {code: wire.ErrorBody for code in (400, 401, 403, 404, 413, 429, 500, 503)}


class TokenAuth(APIKeyHeader):
    """`Authorization: Bearer <token>` (or the raw token), the same tokens as predict."""

    param_name = "Authorization"

    async def authenticate(self, request, key):
        return await services.edge(auth.authenticate, header=key)


router = Router(auth=TokenAuth(), tags=["OpenAI-compatible"])


def _sse_doc(item: type) -> dict:
    """The streamed form of a 200 answer (`stream: true`), for the schema."""
    data = {"type": "string", "description": f"A {item.__name__} as JSON; the last event's data is `[DONE]`."}
    schema = {"type": "object", "properties": {"data": data}, "description": "Server-sent events (`stream: true`)."}
    return {"responses": {200: {"content": {"text/event-stream": {"schema": schema}}}}}


@router.get("/v1/models", response={200: wire.ModelList, **ERRORS}, summary="Models this token may use")
async def list_models(request):
    cards = await services.edge(selectors.model_cards, token=request.auth)
    return wire.ModelList(data=[wire.ModelCard(**card) for card in cards])


@router.get("/v1/models/{model}", response={200: wire.ModelCard, **ERRORS}, summary="One model")
async def retrieve_model(request, model: str):
    return wire.ModelCard(**await services.edge(selectors.model_card, token=request.auth, name=model))


async def _start(request, body: wire.Sampling):
    """Validate and dispatch a completion request; every refusal is raised before model work."""
    target = await services.edge(services.access_deployment, token=request.auth, name=body.model)
    decoding = await services.edge(_decoding, body=body, deployment=target) if body.uses_decoding() else {}
    plan = await services.edge(tools.plan_request, deployment=target, body=body) if isinstance(body, wire.ChatCompletionRequest) else None
    if plan is not None and plan.grammar and decoding.get("grammar"):
        raise InvalidRequest(
            "response_format cannot be combined with tool_choice 'required' or a named function: "
            "both constrain the whole answer", param="response_format")
    prepared = await services.edge(
        services.prepare,
        token=request.auth,
        deployment=target,
        conversation=body.conversation(),
        fields=body.fields(),
        protocol="openai",
    )
    prepared.params.stop = body.stops()
    prepared.params.seed = body.seed
    prepared.params = dataclasses.replace(prepared.params, **decoding)
    if plan is not None and plan.grammar:
        prepared.params.grammar = plan.grammar  # tool_choice required or named: constrained calls
    return await services.dispatch(prepared)


def _decoding(*, body: wire.Sampling, deployment) -> dict:
    """The request's decoding fields as SamplingParams values (response_format compiled to its
    grammar), checked against the deployment's engine and vocabulary."""
    values = body.decoding()
    check_decoding(deployment=deployment, values=values)
    return values


def _sse_response(stream) -> StreamingHttpResponse:
    response = StreamingHttpResponse(stream, content_type="text/event-stream; charset=utf-8")
    for name, value in SSE.response_headers().items():
        response[name] = value
    return response


async def _complete(request, response: HttpResponse, body: wire.Sampling, shape_class):
    """A chat or text completion: dispatch, then the whole answer or its server-sent events; both
    carry the stored request's id (`X-Request-Id`: resume it at /api/requests/<id>/events)."""
    generation = await _start(request, body)
    shape = shape_class({"id": f"{shape_class.prefix}{generation.request_id}", "created": wire.now(), "model": body.model}, body)
    response["X-Request-Id"] = generation.request_id
    plan = getattr(body, "tool_plan", None)
    if body.stream:
        stream = ToolCallStream(shape, plan, include_usage=body.include_usage) if plan and plan.active else None
        streamed = _sse_response(relay(generation, stream or OpenAIStream(shape, include_usage=body.include_usage)))
        streamed["X-Request-Id"] = generation.request_id
        return streamed
    answer = await first(generation, whole_answer(shape, body))
    if answer is None or isinstance(answer, ApiError):
        raise failed(answer, generation.request_id)
    return answer


def failed(error: ApiError | None, request_id: str) -> ApiError:
    """The error a whole answer ended in (or none came), naming the stored request."""
    error = error or ServerError("The stream ended without an answer.")
    error.request_id = request_id
    return error


@router.post(
    "/v1/chat/completions",
    response={200: wire.ChatCompletion, **ERRORS},
    summary="Chat completion",
    openapi_extra=_sse_doc(wire.ChatCompletionChunk),
)
async def chat_completions(request, response: HttpResponse, body: wire.ChatCompletionRequest):
    return await _complete(request, response, body, ChatShape)


@router.post(
    "/v1/completions",
    response={200: wire.Completion, **ERRORS},
    summary="Text completion (the prompt is one user turn of the deployment's chat template)",
    openapi_extra=_sse_doc(wire.Completion),
)
async def completions(request, response: HttpResponse, body: wire.CompletionRequest):
    return await _complete(request, response, body, CompletionShape)


@router.post("/v1/embeddings", response={200: wire.EmbeddingList, **ERRORS}, summary="Embeddings")
async def create_embeddings(request, response: HttpResponse, body: wire.EmbeddingRequest):
    name = selectors.embedding_model_name(body.model)
    if body.dimensions is not None and body.dimensions != settings.EMBEDDING_DIMENSIONS:
        raise InvalidRequest(
            f"dimensions: the model '{name}' gives {settings.EMBEDDING_DIMENSIONS} dimensions only.", param="dimensions"
        )
    texts = body.texts()
    await services.edge(lambda: quotas.check(user=request.auth.user))  # embeddings' tokens count too
    await services.edge(ratelimits.admit, token=request.auth)
    log = {"request_id": embeddings.new_id(), "token": request.auth, "texts": texts, "model": name}
    try:
        vectors, tokens = await embeddings.embed(texts, request_id=log["request_id"])
    except ApiError as exc:
        await services.edge(embeddings.log_embedding, **log, tokens=None, error=exc.message)
        exc.request_id = log["request_id"]
        raise
    await ratelimits.record_tokens(token=request.auth, tokens=tokens)
    await services.edge(embeddings.log_embedding, **log, tokens=tokens, error="")
    response["X-Request-Id"] = log["request_id"]
    data = [wire.Embedding(index=i, embedding=wire.encode_embedding(v, body.encoding_format)) for i, v in enumerate(vectors)]
    return wire.EmbeddingList(data=data, model=name, usage=wire.EmbeddingUsage(prompt_tokens=tokens, total_tokens=tokens))
