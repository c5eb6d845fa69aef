"""The Responses stream formatter (chat/formatters/responses.py) fed fixed event sequences: a
failure ends in response.failed, and an answer with tool calls sends each function call's
events; every event validates against the `openai` client's own event types."""

import asyncio
import json
from types import SimpleNamespace

from openai.types.responses import ResponseStreamEvent
from pydantic import TypeAdapter

from chat.formatters.openai import ChatShape
from chat.formatters.tool_calls import whole_answer
from chat.formatters.responses import FINISHED, ResponsesStream
from chat.protocols import openai as wire
from chat.relay import relay
from chat.responses import Draft
from chat.responses_protocol import ResponsesRequest
from llmsite import contract
from tests.chat.test_formatters import Events

USAGE = {"prompt_tokens": 5, "completion_tokens": 3}


def drive(formatter: ResponsesStream, *events) -> list[dict]:
    async def collect():
        return [item async for item in relay(Events(*events), formatter)]

    items = asyncio.run(collect())
    assert items[-1] is FINISHED
    sent = [*items[:-1], formatter.end()]
    parsed = []
    for item in sent:
        kind, data = item.split("\n")[:2]
        event = json.loads(data.removeprefix("data: "))
        assert kind == f"event: {event['type']}"
        TypeAdapter(ResponseStreamEvent).validate_python(event)
        parsed.append(event)
    assert [event["sequence_number"] for event in parsed] == list(range(len(parsed)))
    return parsed


def formatter(shape=None, **fields) -> ResponsesStream:
    body = ResponsesRequest(model="default", input="hi", **fields)
    draft = Draft(body, item_id="abc", history=[], user_id=1)
    chat = wire.ChatCompletionRequest(model="default", messages=[{"role": "user", "content": "hi"}])
    shape = shape or ChatShape({"id": "chatcmpl-x", "created": 0, "model": "default"}, chat)
    return ResponsesStream(draft, shape, whole_answer(shape, chat), whole_text=bool(fields.get("tools")))


def test_a_failed_answer_ends_with_response_failed_naming_the_error():
    events = drive(formatter(), contract.Delta("Hel"), contract.Error("the worker died"))
    assert [e["type"] for e in events] == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
        "response.output_text.delta",
        "response.failed",
    ]
    assert events[-1]["response"]["status"] == "failed" and events[-1]["response"]["error"]["message"] == "the worker died"


def test_an_answer_that_reached_max_output_tokens_ends_incomplete():
    events = drive(formatter(), contract.Delta("Hello"), contract.Final("Hello there", "length", USAGE))
    assert [e["delta"] for e in events if e["type"] == "response.output_text.delta"] == ["Hello", " there"]
    assert events[-1]["type"] == "response.incomplete"
    assert events[-1]["response"]["incomplete_details"] == {"reason": "max_output_tokens"}
    assert events[-1]["response"]["output"][0]["status"] == "incomplete"


class CallingShape:
    """An answer with text and two tool calls, as chat completions gives it once tools are parsed."""

    def answer(self, final, sources):
        calls = [
            {"id": f"call_{i}", "type": "function", "function": {"name": "weather", "arguments": json.dumps({"city": city})}}
            for i, city in enumerate(["Paris", "Rome"])
        ]
        choice = SimpleNamespace(message=SimpleNamespace(content="Checking.", tool_calls=calls), finish_reason="tool_calls")
        return SimpleNamespace(choices=[choice], usage=wire.usage(final))


def test_tool_calls_stream_as_function_call_items_after_the_message():
    tools = [{"type": "function", "name": "weather", "parameters": {"type": "object"}}]
    events = drive(formatter(CallingShape(), tools=tools), contract.Delta("<tool_call>..."), contract.Final("<tool_call>...", "stop", USAGE))
    assert [e["type"] for e in events] == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
        "response.output_text.delta",
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        *[
            "response.output_item.added",
            "response.function_call_arguments.delta",
            "response.function_call_arguments.done",
            "response.output_item.done",
        ]
        * 2,
        "response.completed",
    ]
    assert events[4]["delta"] == "Checking."  # the message's text without the calls' markup
    calls = [e["item"] for e in events if e["type"] == "response.output_item.done"][1:]
    assert [(c["call_id"], c["name"], json.loads(c["arguments"])) for c in calls] == [
        ("call_0", "weather", {"city": "Paris"}),
        ("call_1", "weather", {"city": "Rome"}),
    ]
    assert [item["type"] for item in events[-1]["response"]["output"]] == ["message", "function_call", "function_call"]
