"""The OpenAI-compatible API (`/v1/...`): thin async views over the same services as predict."""

import json

from django.conf import settings
from django.http import StreamingHttpResponse
from ninja import Router
from ninja.security import APIKeyHeader
from ninja.streaming import SSE

from chat import embeddings, ratelimits, selectors, services
from chat.errors import InvalidRequest
from chat.errors import ApiError, ServerError
from chat.protocols import openai as wire

ERRORS = {code: wire.ErrorBody for code in (400, 401, 403, 404, 413, 429, 500, 503)}


class TokenAuth(APIKeyHeader):
    """`Authorization: Bearer <token>` (or the raw token), the same tokens as predict."""

    param_name = "Authorization"

    async def authenticate(self, request, key):
        return await services.edge(services.authenticate, header=key)


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
    return await services.dispatch(prepared)


async def _final(generation) -> dict:
    """Wait for the whole answer (non-streaming), with the knowledge base's sources if any."""
    sources = None
    try:
        async for event in generation.events():
            if event["type"] == "sources":
                sources = event["sources"]
            if event["type"] == "final":
                return {**event, "sources": sources}
            if event["type"] == "error":
                raise ServerError(event["message"])
    finally:
        await generation.close()
    raise ServerError("The stream ended without an answer.")


def _event(item) -> str:
    data = item if isinstance(item, str) else json.dumps(item, ensure_ascii=False)
    return SSE.format_chunk(data)


async def _stream(generation, *, first, piece, last, include_usage: bool):
    """Relay the token stream as server-sent events; closing (client gone) cancels the generation."""
    sent = ""
    try:
        if first is not None:
            yield _event(first)
        async for event in generation.events():
            if event["type"] == "delta" and event["text"]:
                sent += event["text"]
                yield _event(piece(event["text"]))
            elif event["type"] == "final":
                if event["text"] != sent and event["text"].startswith(sent):
                    yield _event(piece(event["text"][len(sent) :]))  # the final event is the truth
                for item in last(wire.finish_reason(event["finish_reason"]), wire.usage(event), include_usage):
                    yield _event(item)
                yield _event("[DONE]")
            elif event["type"] == "error":
                yield _event(wire.error_body(ServerError(event["message"])))
    finally:
        await generation.close()


def _sse_response(stream) -> StreamingHttpResponse:
    response = StreamingHttpResponse(stream, content_type="text/event-stream; charset=utf-8")
    for name, value in SSE.response_headers().items():
        response[name] = value
    return response


@router.post(
    "/v1/chat/completions",
    response={200: wire.ChatCompletion, **ERRORS},
    summary="Chat completion",
    openapi_extra=_sse_doc(wire.ChatCompletionChunk),
)
async def chat_completions(request, body: wire.ChatCompletionRequest):
    generation = await _start(request, body)
    meta = {"id": f"chatcmpl-{generation.request_id}", "created": wire.now(), "model": body.model}
    if not body.stream:
        final = await _final(generation)
        message = wire.AssistantMessage(content=final["text"])
        choice = wire.ChatChoice(message=message, finish_reason=wire.finish_reason(final["finish_reason"]))
        return wire.ChatCompletion(**meta, choices=[choice], usage=wire.usage(final), sources=final.get("sources"))

    def chunk(delta: dict, finish=None, usage=None, *, choices=True) -> dict:
        choice = wire.ChatChunkChoice(delta=wire.Delta(**delta), finish_reason=finish)
        return wire.ChatCompletionChunk(**meta, choices=[choice] if choices else [], usage=usage).model_dump()

    def last(finish, usage, include_usage):
        yield chunk({}, finish)
        if include_usage:
            yield chunk({}, usage=usage, choices=False)

    first = chunk({"role": "assistant", "content": ""})
    return _sse_response(
        _stream(generation, first=first, piece=lambda text: chunk({"content": text}), last=last, include_usage=body.include_usage)
    )


@router.post(
    "/v1/completions",
    response={200: wire.Completion, **ERRORS},
    summary="Text completion (the prompt is one user turn of the deployment's chat template)",
    openapi_extra=_sse_doc(wire.Completion),
)
async def completions(request, body: wire.CompletionRequest):
    generation = await _start(request, body)
    meta = {"id": f"cmpl-{generation.request_id}", "created": wire.now(), "model": body.model}
    echo = body.text() if body.echo else ""
    if not body.stream:
        final = await _final(generation)
        choice = wire.CompletionChoice(text=echo + final["text"], finish_reason=wire.finish_reason(final["finish_reason"]))
        return wire.Completion(**meta, choices=[choice], usage=wire.usage(final))

    def chunk(text: str, finish=None, usage=None, *, choices=True) -> dict:
        choice = wire.CompletionChoice(text=text, finish_reason=finish)
        return wire.Completion(**meta, choices=[choice] if choices else [], usage=usage).model_dump()

    def last(finish, usage, include_usage):
        yield chunk("", finish)
        if include_usage:
            yield chunk("", usage=usage, choices=False)

    return _sse_response(
        _stream(generation, first=chunk(echo) if echo else None, piece=chunk, last=last, include_usage=body.include_usage)
    )


@router.post("/v1/embeddings", response={200: wire.EmbeddingList, **ERRORS}, summary="Embeddings")
async def create_embeddings(request, body: wire.EmbeddingRequest):
    name = selectors.embedding_model_name(body.model)
    if body.dimensions is not None and body.dimensions != settings.EMBEDDING_DIMENSIONS:
        raise InvalidRequest(
            f"dimensions: the model '{name}' gives {settings.EMBEDDING_DIMENSIONS} dimensions only.", param="dimensions"
        )
    texts = body.texts()
    await services.edge(ratelimits.admit, token=request.auth)
    try:
        vectors, tokens = await embeddings.embed(texts)
    except ApiError as exc:
        await services.edge(embeddings.log_embedding, token=request.auth, texts=texts, model=name, tokens=None, error=exc.message)
        raise
    await ratelimits.record_tokens(token=request.auth, tokens=tokens)
    await services.edge(embeddings.log_embedding, token=request.auth, texts=texts, model=name, tokens=tokens, error="")
    data = [wire.Embedding(index=i, embedding=wire.encode_embedding(v, body.encoding_format)) for i, v in enumerate(vectors)]
    return wire.EmbeddingList(data=data, model=name, usage=wire.EmbeddingUsage(prompt_tokens=tokens, total_tokens=tokens))
