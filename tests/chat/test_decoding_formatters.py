"""The decoding fields' answers (issue 21) written by the OpenAI formatters from fixed event
sequences: logprobs in chat's and the legacy completions' shapes, n > 1 as choices by index, and
the final event as the truth per answer."""

import asyncio
import json

from chat.formatters.openai import ChatShape, CompletionShape, OpenAIAnswer, OpenAIStream
from chat.protocols import openai as wire
from chat.relay import first, relay
from llmsite import contract

META = {"id": "x-1", "created": 0, "model": "m"}
USAGE = {"prompt_tokens": 5, "completion_tokens": 4}


def entry(token: str, logprob: float, *alternatives: tuple[str, float]) -> dict:
    top = [{"token": t, "logprob": lp, "bytes": list(t.encode())} for t, lp in alternatives]
    return {"token": token, "logprob": logprob, "bytes": list(token.encode()), "top_logprobs": top}


HI = entry("Hi", -0.1, ("Hi", -0.1), ("Hello", -2.5))
BANG = entry("!", -0.3, ("!", -0.3), (".", -1.5))


class Events:
    def __init__(self, *events):
        self._events = events

    async def events(self):
        for event in self._events:
            yield event

    async def close(self):
        pass


def stream(events, formatter) -> list[dict]:
    async def collect():
        return [item async for item in relay(Events(*events), formatter)]

    items = asyncio.run(collect())
    assert items[-1] == "data: [DONE]\n\n"
    return [json.loads(item[len("data: ") :]) for item in items[:-1]]


def whole(events, formatter):
    return asyncio.run(first(Events(*events), formatter))


def chat_request(**fields) -> wire.ChatCompletionRequest:
    return wire.ChatCompletionRequest(model="m", messages=[{"role": "user", "content": "Q"}], **fields)


def test_chat_logprobs_stream_with_their_deltas_and_fill_the_whole_answer():
    events = [contract.Delta("Hi", logprobs=[HI]), contract.Delta("!", logprobs=[BANG]), contract.Final("Hi!", "stop", USAGE, logprobs=[HI, BANG])]
    body = chat_request(logprobs=True, top_logprobs=2)
    chunks = stream(events, OpenAIStream(ChatShape(META, body), include_usage=False))
    content = [e for c in chunks for ch in c["choices"] if ch["logprobs"] for e in ch["logprobs"]["content"]]
    assert [e["token"] for e in content] == ["Hi", "!"]
    assert content[0]["top_logprobs"][1] == {"token": "Hello", "logprob": -2.5, "bytes": list(b"Hello")}
    answer = whole(events, OpenAIAnswer(ChatShape(META, body)))
    assert [e.token for e in answer.choices[0].logprobs.content] == ["Hi", "!"]
    assert answer.choices[0].logprobs.content[1].logprob == -0.3
    plain = whole([contract.Final("Hi!", "stop", USAGE)], OpenAIAnswer(ChatShape(META, chat_request())))
    assert plain.choices[0].logprobs is None


def test_n_answers_stream_as_choices_by_index_each_with_its_finish():
    events = [
        contract.Delta("A", index=0),
        contract.Delta("B", index=1),
        contract.Delta("a", index=0),
        contract.Final(
            "Aa",
            "stop",
            USAGE,
            choices=[{"index": 0, "text": "Aa", "finish_reason": "stop"}, {"index": 1, "text": "Bb", "finish_reason": "length"}],
        ),
    ]
    chunks = stream(events, OpenAIStream(ChatShape(META, chat_request(n=2)), include_usage=True))
    text, finish = {0: "", 1: ""}, {}
    for chunk in chunks:
        for choice in chunk["choices"]:
            text[choice["index"]] += choice["delta"].get("content") or ""
            if choice["finish_reason"]:
                finish[choice["index"]] = choice["finish_reason"]
    assert text == {0: "Aa", 1: "Bb"}  # answer 1's tail ("b") came only in the final event
    assert finish == {0: "stop", 1: "length"}
    roles = [c["choices"][0]["index"] for c in chunks if c["choices"] and c["choices"][0]["delta"].get("role")]
    assert roles == [0, 1]
    assert chunks[-1]["usage"]["completion_tokens"] == 4 and chunks[-1]["choices"] == []


def test_n_answers_whole_are_one_choice_each_and_one_usage():
    final = contract.Final(
        "Aa",
        "stop",
        USAGE,
        choices=[
            {"index": 1, "text": "Bb", "finish_reason": "length", "logprobs": None},
            {"index": 0, "text": "Aa", "finish_reason": "stop", "logprobs": None},
        ],
    )
    answer = whole([final], OpenAIAnswer(ChatShape(META, chat_request(n=2))))
    assert [(c.index, c.message.content, c.finish_reason) for c in answer.choices] == [(0, "Aa", "stop"), (1, "Bb", "length")]
    assert answer.usage.total_tokens == 9
    text = whole([final], OpenAIAnswer(CompletionShape(META, wire.CompletionRequest(model="m", prompt="Q", n=2))))
    assert [(c.index, c.text) for c in text.choices] == [(0, "Aa"), (1, "Bb")]


def test_completion_logprobs_take_the_legacy_shape_with_offsets_after_the_echo():
    events = [contract.Delta("Hi", logprobs=[HI]), contract.Final("Hi!", "stop", USAGE, logprobs=[HI, BANG])]
    body = wire.CompletionRequest(model="m", prompt="Say", echo=True, logprobs=2)
    answer = whole(events, OpenAIAnswer(CompletionShape(META, body)))
    legacy = answer.choices[0].logprobs
    assert legacy.tokens == ["Hi", "!"] and legacy.token_logprobs == [-0.1, -0.3]
    assert legacy.top_logprobs == [{"Hi": -0.1, "Hello": -2.5}, {"!": -0.3, ".": -1.5}]
    assert legacy.text_offset == [3, 5]  # after "Say"
    chunks = stream(events, OpenAIStream(CompletionShape(META, body), include_usage=False))
    offsets = [o for c in chunks for ch in c["choices"] if ch["logprobs"] for o in ch["logprobs"]["text_offset"]]
    assert offsets == [3, 5]  # the tail's entry ("!") came from the final event, continuing the offsets
