"""The OpenAI-compatible wire formats: /v1/chat/completions and /v1/completions, streamed as
server-sent events or answered whole. The two differ only in their `Shape` (how a piece, the
first chunk and a whole answer are written); one formatter of each kind drives both."""

import json

from ninja.streaming import SSE

from chat.protocols import openai as wire
from chat.protocols import openai_decoding as decoding
from chat.relay import Formatter, api_error
from llmsite import contract
from llmsite.errors import ServerError


def sse(item) -> str:
    data = item if isinstance(item, str) else json.dumps(item, ensure_ascii=False)
    return SSE.format_chunk(data)


def answers(final: contract.Final) -> list[dict]:
    """A final event's answers: its `choices` (n > 1), or its one answer as one choice."""
    if final.choices:
        return sorted(final.choices, key=lambda c: c.get("index", 0))
    return [{"index": 0, "text": final.text, "finish_reason": final.finish_reason, "logprobs": final.logprobs}]


class ChatShape:
    prefix = "chatcmpl-"

    def __init__(self, meta: dict, body: wire.ChatCompletionRequest):
        self.meta = meta
        self.n = getattr(body, "n", None) or 1

    def chunk(self, text: str | None = None, finish=None, usage=None, *, role=None, choices=True, index=0, logprobs=None) -> dict:
        delta = wire.Delta(role=role, content=text) if role or text else wire.Delta()
        choice = wire.ChatChunkChoice(index=index, delta=delta, finish_reason=finish, logprobs=decoding.chat_logprobs(logprobs))
        return wire.ChatCompletionChunk(**self.meta, choices=[choice] if choices else [], usage=usage).model_dump()

    def first(self, index: int = 0) -> dict | None:
        return self.chunk("", role="assistant", index=index)

    def answer(self, final: contract.Final, sources) -> wire.ChatCompletion:
        choices = [
            wire.ChatChoice(
                index=a["index"],
                message=wire.AssistantMessage(content=a["text"]),
                finish_reason=wire.finish_reason(a["finish_reason"]),
                logprobs=decoding.chat_logprobs(a.get("logprobs")),
            )
            for a in answers(final)
        ]
        return wire.ChatCompletion(**self.meta, choices=choices, usage=wire.usage(final), sources=sources)


class CompletionShape:
    prefix = "cmpl-"

    def __init__(self, meta: dict, body: wire.CompletionRequest):
        self.meta = meta
        self.n = body.n or 1
        self.echo = body.text() if body.echo else ""
        self.offsets: dict[int, int] = {}  # per answer: where the next streamed token starts (legacy logprobs)

    def chunk(self, text: str | None = None, finish=None, usage=None, *, choices=True, index=0, logprobs=None) -> dict:
        offset = self.offsets.get(index, len(self.echo))
        legacy = decoding.completion_logprobs(logprobs, offset)
        if legacy is not None:
            self.offsets[index] = offset + sum(len(t) for t in legacy.tokens)
        choice = wire.CompletionChoice(index=index, text=text or "", finish_reason=finish, logprobs=legacy)
        return wire.Completion(**self.meta, choices=[choice] if choices else [], usage=usage).model_dump()

    def first(self, index: int = 0) -> dict | None:
        return self.chunk(self.echo, index=index) if self.echo else None

    def answer(self, final: contract.Final, sources) -> wire.Completion:
        choices = [
            wire.CompletionChoice(
                index=a["index"],
                text=self.echo + a["text"],
                finish_reason=wire.finish_reason(a["finish_reason"]),
                logprobs=decoding.completion_logprobs(a.get("logprobs"), len(self.echo)),
            )
            for a in answers(final)
        ]
        return wire.Completion(**self.meta, choices=choices, usage=wire.usage(final))


class OpenAIStream(Formatter):
    """Server-sent events: a first chunk, a chunk per piece, the finish chunk (and the usage
    chunk when asked for), then `[DONE]`; a failure is an error object as its last event."""

    def __init__(self, shape, *, include_usage: bool):
        self.shape, self.include_usage = shape, include_usage

    def begin(self) -> list:
        firsts = [self.shape.first(index) for index in range(getattr(self.shape, "n", 1))]
        return [sse(first) for first in firsts if first is not None]

    def on_delta(self, event: contract.Delta) -> list:
        if not event.text and not event.logprobs:
            return []
        return [sse(self.shape.chunk(event.text, index=event.index, logprobs=event.logprobs))]

    def on_final(self, event: contract.Final) -> list:
        out = [sse(self.shape.chunk(None, wire.finish_reason(a["finish_reason"]), index=a["index"])) for a in answers(event)]
        if self.include_usage:
            out.append(sse(self.shape.chunk(None, usage=wire.usage(event), choices=False)))
        return [*out, sse("[DONE]")]

    def on_error(self, event: contract.Error) -> list:
        return [sse(wire.error_body(ServerError(event.message)))]  # the stream began: a server error


class OpenAIAnswer(Formatter):
    """A whole answer (`stream: false`), with the knowledge base's sources if any; or the error."""

    def __init__(self, shape):
        self.shape = shape
        self.sources = None

    def on_sources(self, event: contract.Sources) -> list:
        self.sources = event.sources
        return []

    def on_final(self, event: contract.Final) -> list:
        return [self.shape.answer(event, self.sources)]

    def on_error(self, event: contract.Error) -> list:
        return [api_error(event)]
