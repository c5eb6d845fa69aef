"""Each wire format is a formatter of typed events (chat/formatters/), driven by one relay
(chat/relay.py): fed a fixed event sequence, each writes exactly its protocol's shape."""

import asyncio
import json

import pytest

from chat.formatters.openai import ChatShape, CompletionShape, OpenAIAnswer, OpenAIStream
from chat.formatters.predict import PredictAnswer, PredictSocket, PredictStream
from chat.protocols import openai as wire
from chat.relay import first, relay
from llmsite import contract
from llmsite.errors import InvalidRequest, ServerError

USAGE = {"prompt_tokens": 5, "completion_tokens": 3}
SOURCES = [{"document": "a.md", "chunk": 0, "score": 0.9, "text": "Paris is..."}]


class Events:
    """A request's events as the subscription would give them; remembers being closed."""

    def __init__(self, *events):
        self._events, self.closed = events, False

    async def events(self):
        for event in self._events:
            yield event

    async def close(self):
        self.closed = True


def run(coroutine):
    return asyncio.run(coroutine)


async def collect(generation, formatter) -> list:
    return [item async for item in relay(generation, formatter)]


def answer(*deltas, final=None, sources=None):
    events = [contract.Start(worker="w")] + ([contract.Sources(sources)] if sources else [])
    events += [contract.Delta(d) for d in deltas]
    return Events(*events, contract.Final(final if final is not None else "".join(deltas), "stop", USAGE))


def test_predict_stream_objects_hold_the_whole_answer_so_far_and_sources_ride_on_the_first():
    generation = answer("Par", "is", sources=SOURCES)
    chunks = [json.loads(c[:-1]) for c in run(collect(generation, PredictStream(history=[], prompt="Q")))]
    assert [c["response"] for c in chunks] == ["Par", "Paris"]
    assert chunks[0]["sources"] == SOURCES and "sources" not in chunks[1]
    assert chunks[-1]["history"] == [["Q", "Paris"]] and generation.closed


def test_the_final_event_is_the_truth_for_every_format():
    """Text the final event holds beyond the deltas goes out as one more piece."""
    streamed = [json.loads(c[:-1])["response"] for c in run(collect(answer("Par", final="Paris"), PredictStream(history=[], prompt="Q")))]
    assert streamed[-1] == "Paris"
    socket = run(collect(answer("Par", final="Paris"), PredictSocket(streaming=True, return_sources=False)))
    assert "".join(socket) == "Paris"
    shape = ChatShape({"id": "chatcmpl-1", "created": 0, "model": "m"}, None)
    events = run(collect(answer("Par", final="Paris"), OpenAIStream(shape, include_usage=False)))
    pieces = [json.loads(e[len("data: ") :]) for e in events if e.startswith("data: {")]
    assert "".join(p["choices"][0]["delta"].get("content") or "" for p in pieces) == "Paris"


def test_predict_answer_is_one_body_and_an_error_is_the_protocols_error():
    body = run(first(answer("Paris", sources=SOURCES), PredictAnswer(history=[], prompt="Q", with_sources=True)))
    assert body == {"response": "Paris", "history": [["Q", "Paris"]], "usage": USAGE, "sources": SOURCES}
    failed = run(first(Events(contract.Error("worker gone")), PredictAnswer(history=[], prompt="Q", with_sources=False)))
    assert isinstance(failed, ServerError) and failed.message == "worker gone"
    too_long = run(first(Events(contract.Error("too long", kind="invalid_request", param="prompt")), PredictAnswer(history=[], prompt="Q", with_sources=False)))
    assert isinstance(too_long, InvalidRequest) and too_long.status == 400 and too_long.param == "prompt"


def test_predict_socket_sends_deltas_or_the_whole_answer_and_sources_only_when_asked():
    streamed = PredictSocket(streaming=True, return_sources=False)
    assert run(collect(answer("Par", "is", sources=SOURCES), streamed)) == ["Par", "is"] and streamed.answer == "Paris"
    whole = run(collect(answer("Par", "is", sources=SOURCES), PredictSocket(streaming=False, return_sources=True)))
    assert whole == [json.dumps({"sources": SOURCES}, ensure_ascii=False), "Paris"]
    with pytest.raises(ServerError):
        run(collect(Events(contract.Error("boom")), PredictSocket(streaming=True, return_sources=False)))


def test_openai_chat_and_text_completions_share_one_skeleton():
    meta = {"id": "x-1", "created": 0, "model": "m"}
    chat = run(collect(answer("Hi"), OpenAIStream(ChatShape(meta, None), include_usage=True)))
    assert [json.loads(e[6:])["choices"][0]["delta"] if '"choices": [{' in e else e for e in chat[:2]] == [
        {"role": "assistant", "content": ""},
        {"role": None, "content": "Hi"},
    ]
    assert chat[-1] == "data: [DONE]\n\n" and json.loads(chat[-2][6:])["usage"]["total_tokens"] == 8
    echo = wire.CompletionRequest(model="m", prompt="Say", echo=True)
    text = run(collect(answer("Hi"), OpenAIStream(CompletionShape(meta, echo), include_usage=False)))
    assert [json.loads(e[6:])["choices"][0]["text"] for e in text[:-1]] == ["Say", "Hi", ""]
    whole = run(first(answer("Hi"), OpenAIAnswer(CompletionShape(meta, echo))))
    assert whole.choices[0].text == "SayHi" and whole.usage.prompt_tokens == 5
    failed = run(collect(Events(contract.Error("boom")), OpenAIStream(ChatShape(meta, None), include_usage=False)))
    assert json.loads(failed[-1][6:])["error"]["type"] == "server_error"
