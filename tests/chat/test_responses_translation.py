"""A Responses request as the chat completions fields it amounts to (chat/responses.py), and a
stored response's output as the messages that continue it: text.format, flat function tools,
a named tool_choice, function calls and their outputs."""

import json

from chat.responses import chat_tools, input_messages, output_messages
from chat.responses_protocol import ResponsesRequest

SCHEMA = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
TOOL = {"type": "function", "name": "get_weather", "description": "The weather.", "parameters": SCHEMA, "strict": True}


def request(**fields) -> ResponsesRequest:
    return ResponsesRequest.model_validate({"model": "default", "input": "hi", **fields})


def test_text_format_becomes_response_format():
    assert chat_tools(request(text={"format": {"type": "text"}})) == {}
    assert chat_tools(request(text={"format": {"type": "json_object"}})) == {"response_format": {"type": "json_object"}}
    form = {"type": "json_schema", "name": "answer", "schema": SCHEMA, "strict": True}
    assert chat_tools(request(text={"format": form})) == {
        "response_format": {"type": "json_schema", "json_schema": {"name": "answer", "schema": SCHEMA, "strict": True}}
    }


def test_flat_function_tools_and_a_named_tool_choice_become_chat_completions_shapes():
    fields = chat_tools(request(tools=[TOOL], tool_choice={"type": "function", "name": "get_weather"}))
    assert fields == {
        "tools": [{"type": "function", "function": {"name": "get_weather", "description": "The weather.", "parameters": SCHEMA, "strict": True}}],
        "tool_choice": {"type": "function", "function": {"name": "get_weather"}},
    }
    assert chat_tools(request(tools=[TOOL], tool_choice="required"))["tool_choice"] == "required"


ARGS = json.dumps({"city": "Paris"})


def call(call_id: str) -> dict:
    return {"id": call_id, "type": "function", "function": {"name": "get_weather", "arguments": ARGS}}


def test_function_calls_and_outputs_in_the_input_become_tool_messages():
    args = ARGS
    body = request(
        input=[
            {"role": "user", "content": [{"type": "input_text", "text": "Weather in Paris and Rome?"}]},
            {"type": "function_call", "call_id": "c1", "name": "get_weather", "arguments": args},
            {"type": "function_call", "call_id": "c2", "name": "get_weather", "arguments": args},
            {"type": "function_call_output", "call_id": "c1", "output": "sunny"},
            {"type": "function_call_output", "call_id": "c2", "output": "rain"},
        ]
    )
    assert input_messages(body) == [
        {"role": "user", "content": "Weather in Paris and Rome?"},
        {"role": "assistant", "content": None, "tool_calls": [call("c1"), call("c2")]},
        {"role": "tool", "tool_call_id": "c1", "content": "sunny"},
        {"role": "tool", "tool_call_id": "c2", "content": "rain"},
    ]
    output = [
        {"type": "message", "id": "msg_1", "role": "assistant", "status": "completed", "content": [{"type": "output_text", "text": "Let me look.", "annotations": []}]},
        {"type": "function_call", "id": "fc_1", "call_id": "c1", "name": "get_weather", "arguments": args, "status": "completed"},
    ]
    assert output_messages(output) == [{"role": "assistant", "content": "Let me look.", "tool_calls": [call("c1")]}]
