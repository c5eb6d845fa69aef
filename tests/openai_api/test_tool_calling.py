"""Tool calling through the official `openai` client, on the default model (SmolLM2-135M, whose chat
template has no tool format): tool_choice `required` and named are constrained, so every answer is
calls whose arguments match the tool's schema, streamed or not; a tool's result fed back gets an
answer; bad tools, tool_choice and tool turns are 400s naming the field, and reach no worker."""

import json

import jsonschema_rs
import llguidance.hf
import pytest
from llguidance import LLMatcher
from openai import BadRequestError

from chat.models import Deployment, RequestLog
from chat.prompting import edge_tokenizer
from chat.tools import plan_tools

WEATHER_PARAMETERS = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "maxLength": 24},
        "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
        "days": {"type": "integer", "minimum": 1, "maximum": 7},
    },
    "required": ["city", "unit", "days"],
}
TIME_PARAMETERS = {"type": "object", "properties": {"timezone": {"type": "string", "maxLength": 32}}, "required": ["timezone"]}
TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "description": "The weather forecast for a city.", "parameters": WEATHER_PARAMETERS}},
    {"type": "function", "function": {"name": "get_time", "description": "The time in a timezone.", "parameters": TIME_PARAMETERS}},
]
VALIDATORS = {"get_weather": jsonschema_rs.validator_for(WEATHER_PARAMETERS), "get_time": jsonschema_rs.validator_for(TIME_PARAMETERS)}
PROMPTS = [
    f"{question} {place}?"
    for question in ("What is the weather in", "Will it rain in", "What time is it in", "Should I take a coat in")
    for place in ("Paris", "Tokyo", "Lima", "Oslo", "Cairo")
]
NAMED = {"type": "function", "function": {"name": "get_weather"}}


def ask(client, prompt: str, tool_choice, seed: int, **extra):
    return client.chat.completions.create(
        model="default",
        messages=[{"role": "user", "content": prompt}],
        tools=TOOLS,
        tool_choice=tool_choice,
        temperature=1.0,
        seed=seed,
        max_tokens=120,
        **extra,
    )


def assert_valid_calls(choice, only: str | None = None):
    assert choice.finish_reason == "tool_calls", choice
    calls = choice.message.tool_calls
    assert calls and choice.message.content is None
    for call in calls:
        assert call.type == "function" and call.id.startswith("call_")
        assert call.function.name == (only or call.function.name) and call.function.name in VALIDATORS
        VALIDATORS[call.function.name].validate(json.loads(call.function.arguments))


@pytest.mark.parametrize("tool_choice", ["required", NAMED], ids=["required", "named"])
def test_constrained_tool_choice_always_gives_calls_that_match_the_schema(client, tool_choice):
    assert len(PROMPTS) == 20
    for seed, prompt in enumerate(PROMPTS):
        answer = ask(client, prompt, tool_choice, seed)
        assert_valid_calls(answer.choices[0], only="get_weather" if tool_choice is NAMED else None)


@pytest.mark.parametrize("tool_choice", ["required", NAMED], ids=["required", "named"])
def test_streamed_calls_agree_with_the_whole_answer(client, tool_choice):
    whole = ask(client, "What is the weather in Rome?", tool_choice, 7).choices[0]
    assert_valid_calls(whole)
    chunks = list(ask(client, "What is the weather in Rome?", tool_choice, 7, stream=True))
    deltas = [c.choices[0].delta for c in chunks if c.choices]
    streamed: dict[int, dict] = {}
    for delta in deltas:
        for call in delta.tool_calls or []:
            if call.id is not None:  # a call's first chunk: its id, type and name, as OpenAI streams them
                assert call.type == "function" and call.function.name and call.index not in streamed
                streamed[call.index] = {"name": call.function.name, "arguments": call.function.arguments or ""}
            else:
                streamed[call.index]["arguments"] += call.function.arguments or ""
    assert not "".join(d.content or "" for d in deltas)
    assert [(c["name"], json.loads(c["arguments"])) for _, c in sorted(streamed.items())] == [
        (c.function.name, json.loads(c.function.arguments)) for c in whole.message.tool_calls
    ]
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["tool_calls"]


def test_a_tool_result_fed_back_gets_an_answer(client):
    call = {"id": "call_abc", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris", "unit": "celsius", "days": 1}'}}
    messages = [
        {"role": "user", "content": "What is the weather in Paris?"},
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "call_abc", "content": "Sunny, 21 degrees."},
    ]
    for tool_choice in ("none", None):  # with the tools (not to be called again), and without them
        extra = {"tools": TOOLS, "tool_choice": tool_choice} if tool_choice else {}
        answer = client.chat.completions.create(model="default", messages=messages, temperature=0, max_tokens=24, **extra)
        choice = answer.choices[0]
        assert choice.finish_reason in ("stop", "length") and choice.message.content and not choice.message.tool_calls


@pytest.mark.parametrize(
    "change, param",
    [
        ({"tool_choice": {"type": "function", "function": {"name": "launch_rocket"}}}, "tool_choice"),
        ({"tool_choice": "auto"}, "tool_choice"),  # SmolLM2's template has no tool format
        ({}, "tool_choice"),  # auto is the default with tools
        ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {"a": {"type": "strin"}}}}}], "tool_choice": "required"}, "tools[0].function.parameters"),
        ({"messages": [{"role": "user", "content": "Hi"}, {"role": "tool", "tool_call_id": "call_nope", "content": "42"}], "tool_choice": "required"}, "messages[1].tool_call_id"),
    ],
)
def test_bad_tool_input_is_refused_naming_the_field_before_any_worker(client, user, change, param):
    request = {"model": "default", "messages": [{"role": "user", "content": "Hi"}], "tools": TOOLS, "max_tokens": 8, **change}
    with pytest.raises(BadRequestError) as refused:
        client.chat.completions.create(**request)
    assert refused.value.status_code == 400
    assert refused.value.body["param"] == param and param.split("[")[0] in refused.value.body["message"]
    assert not RequestLog.objects.filter(user=user).exists()


def test_the_required_grammar_admits_valid_calls_only(stack):
    """What the workers are sent for `required`, checked with llguidance and the default model's tokenizer."""
    tokenizer = edge_tokenizer(Deployment.objects.get(name="default").tokenizer_files)
    lltok = llguidance.hf.from_tokenizer(tokenizer)

    def admits(text: str, parallel: bool | None = True) -> bool:
        grammar = plan_tools(tools=TOOLS, tool_choice="required", parallel=parallel, template=None, model="default").grammar
        matcher = LLMatcher(lltok, grammar)
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        return matcher.consume_tokens(ids) and not matcher.is_error() and matcher.is_accepting()

    assert admits('[{"name":"get_time","arguments":{"timezone":"UTC"}}]')
    assert admits('[{"name":"get_weather","arguments":{"city":"Oslo","unit":"celsius","days":3}},{"name":"get_time","arguments":{"timezone":"CET"}}]')
    assert not admits('[{"name":"get_weather","arguments":{"city":"Oslo","unit":"kelvin","days":3}}]')
    assert not admits('[{"name":"launch_rocket","arguments":{}}]')
    assert not admits("[]")
    # Without parallel_tool_calls: true, one call (a small model would repeat its call otherwise).
    assert admits('[{"name":"get_time","arguments":{"timezone":"UTC"}}]', parallel=None)
    assert not admits('[{"name":"get_time","arguments":{"timezone":"UTC"}},{"name":"get_time","arguments":{"timezone":"CET"}}]', parallel=None)
