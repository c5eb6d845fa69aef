"""Tool calling's formats, without a model: tools and tool turns rendered through Qwen2.5's published
chat template (vendored in chat/chat_formats/qwen2.5.jinja), the families' call formats parsed
from recorded answers into tool_calls, what a stream may send before it knows, and the checks
that refuse bad tools, tool_choice and tool turns (each naming its field)."""

import asyncio
import json

import pytest
from tokenizers import Tokenizer
from tokenizers.models import WordLevel
from transformers import PreTrainedTokenizerFast

from chat.chat_formats import vendored_template
from chat.formatters.openai import ChatShape
from chat.formatters.tool_calls import ToolCallAnswer, ToolCallStream
from chat.prompting import render_prompt
from chat.relay import first, relay
from chat.tool_calls import HeldText, parse_answer
from chat.tools import plan_tools, template_messages, tool_syntax
from llmsite import contract
from llmsite.errors import InvalidRequest

SMOLLM2_TEMPLATE = (  # SmolLM2-135M-Instruct's chat_template: ChatML with no tool format
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\n"
    "You are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city.",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}
TIME = {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object", "properties": {}}}}
TOOLS = [WEATHER, TIME]
CONVERSATION = [
    {"role": "system", "content": "You are a terse assistant."},
    {"role": "user", "content": "Weather in Paris, and the time?"},
    {
        "role": "assistant",
        "content": "",
        "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}},
            {"id": "call_2", "type": "function", "function": {"name": "get_time", "arguments": "{}"}},
        ],
    },
    {"role": "tool", "tool_call_id": "call_1", "content": "sunny, 21 C"},
    {"role": "tool", "tool_call_id": "call_2", "content": "14:05"},
]
WEATHER_JSON = (
    '{"type": "function", "function": {"name": "get_weather", "description": "The weather in a city.", "parameters": '
    '{"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}'
)
# Written out by hand from Qwen2.5-0.5B-Instruct's published chat_template (tokenizer_config.json).
QWEN25_EXPECTED = (
    "<|im_start|>system\nYou are a terse assistant.\n\n# Tools\n\nYou may call one or more functions to assist with "
    "the user query.\n\nYou are provided with function signatures within <tools></tools> XML tags:\n<tools>\n"
    + WEATHER_JSON
    + '\n{"type": "function", "function": {"name": "get_time", "parameters": {"type": "object", "properties": {}}}}\n'
    "</tools>\n\nFor each function call, return a json object with function name and arguments within "
    '<tool_call></tool_call> XML tags:\n<tool_call>\n{"name": <function-name>, "arguments": <args-json-object>}\n'
    "</tool_call><|im_end|>\n"
    "<|im_start|>user\nWeather in Paris, and the time?<|im_end|>\n"
    '<|im_start|>assistant\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>\n'
    '<tool_call>\n{"name": "get_time", "arguments": {}}\n</tool_call><|im_end|>\n'
    "<|im_start|>user\n<tool_response>\nsunny, 21 C\n</tool_response>\n<tool_response>\n14:05\n</tool_response><|im_end|>\n"
    "<|im_start|>assistant\n"
)


@pytest.fixture(scope="module")
def tokenizer():
    vocab = {"<unk>": 0, "<|im_start|>": 1, "<|im_end|>": 2}
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(WordLevel(vocab, unk_token="<unk>")), unk_token="<unk>")
    tokenizer.chat_template = SMOLLM2_TEMPLATE
    return tokenizer


def plan(choice, template=None, tools=TOOLS, parallel=None):
    return plan_tools(tools=tools, tool_choice=choice, parallel=parallel, template=template, model="m")


def test_qwen25_renders_tools_and_tool_turns_exactly_as_its_published_template(tokenizer):
    qwen = vendored_template("qwen2.5")
    rendered = render_prompt(tokenizer, template_messages(CONVERSATION), qwen, tools=TOOLS)
    assert rendered == QWEN25_EXPECTED
    # The same as transformers' own apply_chat_template with tools= on a tokenizer carrying the template.
    direct = PreTrainedTokenizerFast(tokenizer_object=tokenizer.backend_tokenizer, unk_token="<unk>")
    direct.chat_template = qwen
    assert direct.apply_chat_template(template_messages(CONVERSATION), tools=TOOLS, tokenize=False, add_generation_prompt=True) == rendered


def test_a_template_without_a_tool_format_gets_the_calls_as_text(tokenizer):
    rendered = render_prompt(tokenizer, template_messages(CONVERSATION), tools=TOOLS)
    assert '<|im_start|>assistant\n[{"name": "get_weather", "arguments": {"city": "Paris"}}, {"name": "get_time", "arguments": {}}]<|im_end|>\n' in rendered
    assert "<|im_start|>tool\nsunny, 21 C<|im_end|>\n<|im_start|>tool\n14:05<|im_end|>\n<|im_start|>assistant\n" in rendered
    # Only constrained modes render tools here: they are listed in the system prompt, after the client's.
    system = rendered.split("<|im_start|>user")[0]
    assert system.startswith("<|im_start|>system\nYou are a terse assistant.\n\nYou call functions.") and WEATHER["function"]["description"] in system


def test_families_tool_formats_are_read_from_their_templates():
    assert tool_syntax(vendored_template("qwen2.5")) == "hermes"
    assert tool_syntax(SMOLLM2_TEMPLATE) == ""
    assert tool_syntax("{{ tools }}[TOOL_CALLS]") == "mistral"
    assert tool_syntax("{% if tools %}<|python_tag|>{% endif %}") == "llama3"
    assert tool_syntax("<tool_call> but no tools variable") == ""


@pytest.mark.parametrize(
    "syntax, answer, content, calls",
    [
        ("hermes", '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>', None, [("get_weather", {"city": "Paris"})]),
        (
            "hermes",
            'Checking.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n</tool_call>\n'
            '<tool_call>\n{"name": "get_time", "arguments": {}}\n</tool_call>',
            "Checking.",
            [("get_weather", {"city": "Oslo"}), ("get_time", {})],
        ),
        ("hermes", '<tool_call>\n{"name": "get_time", "arguments": {}}', None, [("get_time", {})]),  # stopped before </tool_call>
        ("llama3", '{"name": "get_weather", "parameters": {"city": "Rome"}}', None, [("get_weather", {"city": "Rome"})]),
        ("llama3", '<|python_tag|>{"name": "get_time", "parameters": {}}', None, [("get_time", {})]),
        (
            "mistral",
            '[TOOL_CALLS] [{"name": "get_weather", "arguments": {"city": "Lima"}}, {"name": "get_time", "arguments": {}}]',
            None,
            [("get_weather", {"city": "Lima"}), ("get_time", {})],
        ),
        ("hermes", "It is sunny in Paris.", "It is sunny in Paris.", []),
        ("hermes", '<tool_call>\n{"name": "launch_rocket", "arguments": {}}\n</tool_call>', None, []),  # not a tool of the request
        ("llama3", "The answer is {not json}", "The answer is {not json}", []),
    ],
)
def test_family_answers_become_tool_calls(syntax, answer, content, calls):
    tool_plan = plan("auto", template=vendored_template("qwen2.5"))
    tool_plan.syntax = syntax
    got_content, got_calls = parse_answer(answer, tool_plan)
    assert [(c.name, json.loads(c.arguments)) for c in got_calls] == calls
    if calls:
        assert got_content == content and all(c.id.startswith("call_") for c in got_calls)
        assert len({c.id for c in got_calls}) == len(got_calls)
    else:
        assert got_content == answer


def test_constrained_answers_become_tool_calls():
    named = plan({"type": "function", "function": {"name": "get_weather"}})
    assert [(c.name, c.arguments) for c in parse_answer('{"city":"Paris"}', named)[1]] == [("get_weather", '{"city": "Paris"}')]
    required = plan("required")
    _, calls = parse_answer('[{"name":"get_time","arguments":{}},{"name":"get_weather","arguments":{"city":"X"}}]', required)
    assert [c.name for c in calls] == ["get_time", "get_weather"]
    assert parse_answer('{"city": "Par', named) == ('{"city": "Par', [])  # cut short (length): text, no call


def test_a_stream_sends_text_only_until_a_call_may_begin():
    held = HeldText(plan("auto", template=vendored_template("qwen2.5")))
    assert [held.feed(piece) for piece in ["Let me", " check <to", "ol_call>\n{", '"name"']] == ["Let me", " check ", "", ""]
    assert held.unsent == '<tool_call>\n{"name"'
    plain = HeldText(plan("auto", template=vendored_template("qwen2.5")))
    assert "".join(plain.feed(p) for p in ["I <3 ", "tools"]) + plain.unsent == "I <3 tools"
    constrained = HeldText(plan("required"))
    assert constrained.feed('[{"name"') == "" and constrained.unsent == '[{"name"'


@pytest.mark.parametrize(
    "kwargs, param",
    [
        (dict(choice={"type": "function", "function": {"name": "nope"}}), "tool_choice"),
        (dict(choice="auto", template=SMOLLM2_TEMPLATE), "tool_choice"),  # no tool format: auto cannot be
        (dict(choice=None, template=SMOLLM2_TEMPLATE), "tool_choice"),  # auto is the default with tools
        (dict(choice="required", tools=[]), "tool_choice"),
        (dict(choice="required", tools=[WEATHER, WEATHER]), "tools[1].function.name"),
        (
            dict(choice="required", tools=[TIME, {"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {"a": {"type": "strin"}}}}}]),
            "tools[1].function.parameters",
        ),
    ],
)
def test_bad_tools_and_tool_choice_are_refused_naming_the_field(kwargs, param):
    with pytest.raises(InvalidRequest) as refused:
        plan(**kwargs)
    assert refused.value.param == param


def test_constrained_modes_work_without_a_tool_format_and_none_is_plain():
    assert plan("required", template=SMOLLM2_TEMPLATE).grammar
    assert plan({"type": "function", "function": {"name": "get_time"}}, template=SMOLLM2_TEMPLATE).grammar
    assert not plan("none", template=SMOLLM2_TEMPLATE).active


@pytest.mark.parametrize(
    "messages, param",
    [
        ([{"role": "user", "content": "Hi"}, {"role": "tool", "tool_call_id": "call_9", "content": "x"}], "messages[1].tool_call_id"),
        ([{"role": "tool", "content": "x"}], "messages[0].tool_call_id"),
        (
            [{"role": "assistant", "content": "", "tool_calls": [{"id": "c", "type": "function", "function": {"name": "f", "arguments": "{oops"}}]}],
            "messages[0].tool_calls[0].function.arguments",
        ),
    ],
)
def test_tool_turns_that_answer_no_call_are_refused(messages, param):
    with pytest.raises(InvalidRequest) as refused:
        template_messages(messages)
    assert refused.value.param == param


class _Events:
    """A request's events as its subscription would give them."""

    def __init__(self, *deltas):
        usage = {"prompt_tokens": 5, "completion_tokens": 3}
        self._events = [contract.Start(worker="w"), *(contract.Delta(d) for d in deltas), contract.Final("".join(deltas), "stop", usage)]

    async def events(self):
        for event in self._events:
            yield event

    async def close(self):
        pass


def _events(*deltas):
    return _Events(*deltas)


def test_calls_are_streamed_as_openai_streams_them_and_agree_with_the_whole_answer():
    meta = {"id": "chatcmpl-1", "created": 0, "model": "m"}
    pieces = ["Checking. <tool", '_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n</tool_call>\n<tool_call>\n', '{"name": "get_time", "arguments": {}}\n</tool_call>']
    auto = plan("auto", template=vendored_template("qwen2.5"))
    stream = asyncio.run(_collect(_events(*pieces), ToolCallStream(ChatShape(meta, None), auto, include_usage=False)))
    chunks = [json.loads(item[6:]) for item in stream[:-1]]
    deltas = [c["choices"][0]["delta"] for c in chunks]
    assert "".join(d.get("content") or "" for d in deltas) == "Checking. "
    calls = [call for d in deltas for call in d.get("tool_calls") or []]
    firsts = [c for c in calls if "id" in c]
    assert [(c["index"], c["type"], c["function"]["name"], c["function"]["arguments"]) for c in firsts] == [(0, "function", "get_weather", ""), (1, "function", "get_time", "")]
    arguments = {i: "".join(c["function"].get("arguments", "") for c in calls if c["index"] == i) for i in (0, 1)}
    assert arguments == {0: '{"city": "Oslo"}', 1: "{}"}
    assert chunks[-1]["choices"][0]["finish_reason"] == "tool_calls" and stream[-1] == "data: [DONE]\n\n"

    whole = asyncio.run(first(_events(*pieces), ToolCallAnswer(ChatShape(meta, None), auto)))
    message = whole.choices[0].message
    assert whole.choices[0].finish_reason == "tool_calls" and message.content == "Checking."
    assert [(c.function.name, c.function.arguments) for c in message.tool_calls] == [("get_weather", '{"city": "Oslo"}'), ("get_time", "{}")]
    assert [c["id"] for c in firsts] != [c.id for c in message.tool_calls] and all(c["id"].startswith("call_") for c in firsts)


def test_an_answer_with_no_call_streams_as_plain_text():
    meta = {"id": "chatcmpl-1", "created": 0, "model": "m"}
    auto = plan("auto", template=vendored_template("qwen2.5"))
    stream = asyncio.run(_collect(_events("It is ", "sunny <3"), ToolCallStream(ChatShape(meta, None), auto, include_usage=False)))
    chunks = [json.loads(item[6:]) for item in stream[:-1]]
    assert "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks) == "It is sunny <3"
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"
    whole = asyncio.run(first(_events("It is sunny."), ToolCallAnswer(ChatShape(meta, None), auto)))
    assert whole.choices[0].message.content == "It is sunny." and whole.choices[0].message.tool_calls is None


async def _collect(generation, formatter) -> list:
    return [item async for item in relay(generation, formatter)]
