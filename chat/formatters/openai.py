"""The OpenAI-compatible wire formats: /v1/chat/completions and /v1/completions, streamed as
server-sent events or answered whole. The two differ only in their `Shape` (how a piece, the
first chunk and a whole answer are written); one formatter of each kind drives both."""

import json

from ninja.streaming import SSE

from chat.protocols import openai as wire
from chat.relay import Formatter, api_error
from llmsite import contract
from llmsite.errors import ServerError


def sse(item) -> str:
    data = item if isinstance(item, str) else json.dumps(item, ensure_ascii=False)
    return SSE.format_chunk(data)


class ChatShape:
    prefix = "chatcmpl-"

    def __init__(self, meta: dict, body: wire.ChatCompletionRequest):
        self.meta = meta

    def chunk(self, text: str | None = None, finish=None, usage=None, *, role=None, choices=True) -> dict:
        delta = wire.Delta(role=role, content=text) if role or text else wire.Delta()
        choice = wire.ChatChunkChoice(delta=delta, finish_reason=finish)
        return wire.ChatCompletionChunk(**self.meta, choices=[choice] if choices else [], usage=usage).model_dump()

    def first(self) -> dict | None:
        return self.chunk("", role="assistant")

    def answer(self, final: contract.Final, sources) -> wire.ChatCompletion:
        message = wire.AssistantMessage(content=final.text)
        choice = wire.ChatChoice(message=message, finish_reason=wire.finish_reason(final.finish_reason))
        return wire.ChatCompletion(**self.meta, choices=[choice], usage=wire.usage(final), sources=sources)


class CompletionShape:
    prefix = "cmpl-"

    def __init__(self, meta: dict, body: wire.CompletionRequest):
        self.meta = meta
        self.echo = body.text() if body.echo else ""

    def chunk(self, text: str | None = None, finish=None, usage=None, *, choices=True) -> dict:
        choice = wire.CompletionChoice(text=text or "", finish_reason=finish)
        return wire.Completion(**self.meta, choices=[choice] if choices else [], usage=usage).model_dump()

    def first(self) -> dict | None:
        return self.chunk(self.echo) if self.echo else None

    def answer(self, final: contract.Final, sources) -> wire.Completion:
        choice = wire.CompletionChoice(text=self.echo + final.text, finish_reason=wire.finish_reason(final.finish_reason))
        return wire.Completion(**self.meta, choices=[choice], usage=wire.usage(final))


class OpenAIStream(Formatter):
    """Server-sent events: a first chunk, a chunk per piece, the finish chunk (and the usage
    chunk when asked for), then `[DONE]`; a failure is an error object as its last event."""

    def __init__(self, shape, *, include_usage: bool):
        self.shape, self.include_usage = shape, include_usage

    def begin(self) -> list:
        first = self.shape.first()
        return [sse(first)] if first is not None else []

    def on_delta(self, event: contract.Delta) -> list:
        return [sse(self.shape.chunk(event.text))] if event.text else []

    def on_final(self, event: contract.Final) -> list:
        out = [sse(self.shape.chunk(None, wire.finish_reason(event.finish_reason)))]
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
