"""The Responses API (`/v1/responses`): thin async views over the chat completions path and the
stored responses of chat/responses.py."""

from django.http import HttpResponse
from ninja import Router

from chat import responses, services
from chat import responses_protocol as rp
from chat.formatters.openai import ChatShape
from chat.formatters.tool_calls import whole_answer
from chat.formatters.responses import FINISHED, ResponsesStream
from chat.openai_views import ERRORS, TokenAuth, _sse_response, _start, failed
from chat.relay import first, relay
from llmsite.errors import ApiError

router = Router(auth=TokenAuth(), tags=["Responses API"])

_STREAM_DOC = {
    "responses": {
        200: {
            "content": {
                "text/event-stream": {
                    "schema": {
                        "type": "object",
                        "description": "Server-sent events (`stream: true`): `event: <type>` and `data: {type, sequence_number, ...}`, "
                        "response.created first and response.completed (.incomplete, .failed) last.",
                    }
                }
            }
        }
    }
}


async def _dispatch(request, body: rp.ResponsesRequest):
    """The chat completions request this amounts to, dispatched; a refusal names the Responses field."""
    user_id = request.auth.user_id
    history = []
    if body.previous_response_id:
        history = await services.edge(responses.response_history, user_id=user_id, response_id=body.previous_response_id)
    chat = responses.chat_request(body, history)
    try:
        generation = await _start(request, chat)
    except ApiError as exc:
        if exc.param in ("messages", "prompt"):
            exc.param = "input"
        raise
    draft = responses.Draft(body, item_id=generation.request_id.replace("-", ""), history=history, user_id=user_id)
    shape = ChatShape({"id": f"chatcmpl-{generation.request_id}", "created": draft.created_at, "model": body.model}, chat)
    return generation, draft, shape, whole_answer(shape, chat)


async def _events(generation, formatter: ResponsesStream, draft: responses.Draft):
    """The stream's events; the answer is stored (unless `store: false`) before the last one."""
    async for item in relay(generation, formatter):
        if item is FINISHED:
            if draft.body.store:
                try:
                    await services.edge(responses.response_store, draft=draft)
                except ApiError as exc:
                    draft.fail(f"The response could not be stored: {exc.message}")
            item = formatter.end()
        yield item


@router.post("/v1/responses", response={200: rp.ResponseObject, **ERRORS}, summary="Create a response", openapi_extra=_STREAM_DOC)
async def create_response(request, response: HttpResponse, body: rp.ResponsesRequest):
    generation, draft, shape, answer = await _dispatch(request, body)
    response["X-Request-Id"] = generation.request_id  # resume it at /api/requests/<id>/events
    if body.stream:
        streamed = _sse_response(_events(generation, ResponsesStream(draft, shape, answer, whole_text=bool(body.tools)), draft))
        streamed["X-Request-Id"] = generation.request_id
        return streamed
    completion = await first(generation, answer)
    if completion is None or isinstance(completion, ApiError):
        raise failed(completion, generation.request_id)
    draft.finish(completion)
    if body.store:
        try:
            await services.edge(responses.response_store, draft=draft)
        except ApiError as exc:  # the answer is kept with its request: resume it there
            raise failed(exc, generation.request_id) from None
    return draft.object()


@router.get("/v1/responses/{response_id}", response={200: rp.ResponseObject, **ERRORS}, summary="A stored response")
async def retrieve_response(request, response_id: str):
    return await services.edge(responses.response_get, user_id=request.auth.user_id, response_id=response_id)


@router.delete("/v1/responses/{response_id}", response={200: rp.DeletedResponse, **ERRORS}, summary="Delete a stored response")
async def delete_response(request, response_id: str):
    return await services.edge(responses.response_delete, user_id=request.auth.user_id, response_id=response_id)
