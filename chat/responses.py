"""The Responses API's services: a request as the chat completions request it amounts to, and the
stored responses (per user, in PostgreSQL) that `previous_response_id` continues.

Generation itself is the chat completions path's (chat/openai_views.py, chat/services.py): this
module only translates, stores and reads.
"""

import datetime

import pydantic

from llmsite.text import storable
from chat.models import StoredResponse
from chat.protocols import openai as wire
from chat import responses_protocol as rp
from llmsite.errors import ApiError, InvalidRequest


class ResponseNotFound(ApiError):
    status = 404
    reason = "not_found"
    code = None  # OpenAI's error has no code here (not a model's "model_not_found")

    def __init__(self, response_id: str, *, param: str | None = None):
        super().__init__(f"No response with id '{response_id}' was found.", param=param)


# --- the request, as chat completions --------------------------------------------------------

# Where a chat completions field's error points, in the Responses request's names.
_FIELD_NAMES = {"messages": "input", "max_completion_tokens": "max_output_tokens", "response_format": "text.format"}


def input_messages(body: rp.ResponsesRequest) -> list[dict]:
    """This request's input as chat messages (function calls and their outputs as the tool
    messages chat completions takes), without the instructions."""
    if isinstance(body.input, str):
        return [{"role": "user", "content": body.input}]
    messages: list[dict] = []
    for item in body.input:
        if isinstance(item, rp.InputMessage):
            messages.append({"role": item.role, "content": item.text()})
        elif isinstance(item, rp.FunctionCallInput):
            _add_call(messages, call_id=item.call_id, name=item.name, arguments=item.arguments)
        else:
            messages.append({"role": "tool", "tool_call_id": item.call_id, "content": item.output})
    return messages


def output_messages(output: list[dict]) -> list[dict]:
    """A stored response's output items as the chat messages that continue it."""
    messages: list[dict] = []
    for item in output:
        if item["type"] == "message":
            messages.append({"role": "assistant", "content": "".join(part["text"] for part in item["content"])})
        elif item["type"] == "function_call":
            _add_call(messages, call_id=item["call_id"], name=item["name"], arguments=item["arguments"])
    return messages


def _add_call(messages: list[dict], *, call_id: str, name: str, arguments: str) -> None:
    """A function call joins the assistant turn just before it (its text, parallel calls), or
    makes one."""
    call = {"id": call_id, "type": "function", "function": {"name": name, "arguments": arguments}}
    if messages and messages[-1]["role"] == "assistant":
        messages[-1].setdefault("tool_calls", []).append(call)
    else:
        messages.append({"role": "assistant", "content": None, "tool_calls": [call]})


def chat_tools(body: rp.ResponsesRequest) -> dict:
    """`tools`, `tool_choice` and `text.format` as chat completions' `tools`, `tool_choice` and
    `response_format`: the fields chat/tools.py and chat/structured.py give their meaning."""
    fields: dict = {}
    if body.tools:
        fields["tools"] = [
            {"type": "function", "function": tool.model_dump(exclude={"type"}, exclude_none=True)} for tool in body.tools
        ]
    choice = body.tool_choice
    if isinstance(choice, dict) and choice.get("type") == "function" and "name" in choice:
        choice = {"type": "function", "function": {"name": choice["name"]}}
    if choice is not None:
        fields["tool_choice"] = choice
    form = body.text.format if body.text else None
    if form is not None and form.type == "json_schema":
        schema = {"name": form.name or "response", "schema": form.schema_ or {}, "strict": form.strict}
        fields["response_format"] = {"type": "json_schema", "json_schema": {k: v for k, v in schema.items() if v is not None}}
    elif form is not None and form.type == "json_object":
        fields["response_format"] = {"type": "json_object"}
    return fields


_SAMPLING = ("temperature", "top_p", "seed", "frequency_penalty", "presence_penalty", "repetition_penalty")


def chat_request(body: rp.ResponsesRequest, history: list[dict]) -> wire.ChatCompletionRequest:
    """The chat completions request a Responses request amounts to; a field that chat completions
    here does not take yet is a 400 naming it (rather than an answer that ignores it)."""
    system = [{"role": "system", "content": body.instructions}] if body.instructions else []
    fields = {name: getattr(body, name) for name in _SAMPLING if getattr(body, name) is not None}
    fields.update(chat_tools(body))
    messages = [*system, *history, *input_messages(body)]
    calls = any(m["role"] == "tool" or m.get("tool_calls") for m in messages)
    for name in [*fields, *(["tools"] if calls else [])]:
        if name not in wire.ChatCompletionRequest.model_fields:
            where = "input" if name not in fields else _FIELD_NAMES.get(name, name)
            raise InvalidRequest(f"{where}: this server does not support {name} yet.", param=where)
    if body.parallel_tool_calls is not None and "parallel_tool_calls" in wire.ChatCompletionRequest.model_fields:
        fields["parallel_tool_calls"] = body.parallel_tool_calls  # a hint: dropped where chat completions has none
    try:
        return wire.ChatCompletionRequest(
            model=body.model, messages=messages, max_completion_tokens=body.max_output_tokens, stream=body.stream, **fields
        )
    except pydantic.ValidationError as exc:
        raise invalid(exc) from None


def invalid(exc: pydantic.ValidationError) -> InvalidRequest:
    first = exc.errors()[0]
    loc = [str(p) for p in first.get("loc", ())]
    head = _FIELD_NAMES.get(loc[0], loc[0]) if loc else "input"
    where = ".".join([head, *loc[1:]])
    return InvalidRequest(f"{where}: {first.get('msg', 'invalid value')}", param=head)


# --- the answer ---------------------------------------------------------------------------------


def status_of(finish_reason: str) -> str:
    return "incomplete" if finish_reason == "length" else "completed"


def output_items(completion: wire.ChatCompletion, item_id: str) -> list[dict]:
    """A chat completion's answer as Responses output items: the message (if it has text or no
    calls) and one function_call item per tool call."""
    choice = completion.choices[0]
    message = choice.message
    status = status_of(choice.finish_reason)
    calls = list(getattr(message, "tool_calls", None) or [])
    items: list[dict] = []
    if message.content or not calls:
        text = rp.OutputText(text=message.content or "")
        items.append(rp.OutputMessage(id=f"msg_{item_id}", status=status, content=[text]).model_dump())
    for i, call in enumerate(calls):
        call = call if isinstance(call, dict) else call.model_dump()
        function = call["function"]
        items.append(
            rp.FunctionCall(id=f"fc_{item_id}_{i}", call_id=call["id"], name=function["name"], arguments=function["arguments"]).model_dump()
        )
    return items


def usage_of(completion: wire.ChatCompletion) -> dict:
    usage = completion.usage
    return rp.ResponseUsage(
        input_tokens=usage.prompt_tokens,
        input_tokens_details=rp.InputTokensDetails(cached_tokens=usage.prompt_tokens_details.cached_tokens),
        output_tokens=usage.completion_tokens,
        total_tokens=usage.total_tokens,
    ).model_dump()


class Draft:
    """One response being made: what its object says before, while and after it is answered."""

    def __init__(self, body: rp.ResponsesRequest, *, item_id: str, history: list[dict], user_id: int):
        self.body, self.item_id, self.history, self.user_id = body, item_id, history, user_id
        self.id = f"resp_{item_id}"
        self.created_at = wire.now()
        self.status, self.output, self.usage, self.error = "in_progress", [], None, None

    def finish(self, completion: wire.ChatCompletion) -> None:
        self.output = output_items(completion, self.item_id)
        self.usage = usage_of(completion)
        self.status = status_of(completion.choices[0].finish_reason)

    def fail(self, message: str) -> None:
        self.status, self.error = "failed", {"code": "server_error", "message": message}

    def params(self) -> dict:
        body = self.body
        return {
            "temperature": body.temperature,
            "top_p": body.top_p,
            "max_output_tokens": body.max_output_tokens,
            "text": body.text.model_dump(by_alias=True, exclude_none=True) if body.text else {"format": {"type": "text"}},
            "tools": [tool.model_dump(exclude_none=True) for tool in body.tools or []],
            "tool_choice": body.tool_choice or "auto",
            "parallel_tool_calls": True if body.parallel_tool_calls is None else body.parallel_tool_calls,
            "metadata": body.metadata or {},
        }

    def object(self) -> dict:
        return response_object(
            id=self.id, created_at=self.created_at, status=self.status, model=self.body.model, output=self.output,
            usage=self.usage, error=self.error, instructions=self.body.instructions,
            previous_response_id=self.body.previous_response_id, params=self.params(), store=self.body.store,
        )  # fmt: skip


def response_object(*, status: str, params: dict, **fields) -> dict:
    incomplete = {"reason": "max_output_tokens"} if status == "incomplete" else None
    return rp.ResponseObject(status=status, incomplete_details=incomplete, **params, **fields).model_dump()


# --- storage ------------------------------------------------------------------------------------


def _stored(*, user_id: int, response_id: str):
    """This user's stored response of that id (none for an id with NUL, which no id holds and
    PostgreSQL text refuses)."""
    found = StoredResponse.objects.filter(user_id=user_id)
    return found.filter(pk=response_id) if "\x00" not in response_id else found.none()


def response_history(*, user_id: int, response_id: str) -> list[dict]:
    """The chat messages that continue a stored response of this user: its chain's earlier
    messages, its input and its output (its instructions stay its own, as OpenAI does)."""
    row = _stored(user_id=user_id, response_id=response_id).only("history", "input", "output").first()
    if row is None:
        raise ResponseNotFound(response_id, param="previous_response_id")
    return [*row.history, *row.input, *output_messages(row.output)]


def response_store(*, draft: Draft) -> None:
    fields = storable(  # what the client sent may hold NUL characters, which PostgreSQL refuses
        {
            "model": draft.body.model,
            "instructions": draft.body.instructions or "",
            "history": draft.history,
            "input": input_messages(draft.body),
            "output": draft.output,
            "error": draft.error,
            "params": draft.params(),
            "previous_response_id": draft.body.previous_response_id or "",
        }
    )
    StoredResponse.objects.create(
        id=draft.id,
        user_id=draft.user_id,
        status=draft.status,
        usage=draft.usage,
        created_at=datetime.datetime.fromtimestamp(draft.created_at, tz=datetime.timezone.utc),
        **fields,
    )


def response_get(*, user_id: int, response_id: str) -> dict:
    """A stored response of this user as its object; 404 for another user's or an unknown id."""
    row = _stored(user_id=user_id, response_id=response_id).first()
    if row is None:
        raise ResponseNotFound(response_id)
    return response_object(
        id=row.id, created_at=int(row.created_at.timestamp()), status=row.status, model=row.model, output=row.output,
        usage=row.usage, error=row.error, instructions=row.instructions or None,
        previous_response_id=row.previous_response_id or None, params=row.params, store=True,
    )  # fmt: skip


def response_delete(*, user_id: int, response_id: str) -> dict:
    deleted, _ = _stored(user_id=user_id, response_id=response_id).delete()
    if not deleted:
        raise ResponseNotFound(response_id)
    return rp.DeletedResponse(id=response_id).model_dump()
