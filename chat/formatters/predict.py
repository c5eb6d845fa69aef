"""The predict API's wire formats (PROTOCOL.md) as formatters of a request's events."""

import json

from chat.protocols.predict import chunk, error_chunk
from chat.relay import Formatter, api_error
from llmsite import contract
from llmsite.errors import ServerError


class PredictStream(Formatter):
    """HTTP, streamed: JSON objects each followed by NUL, each holding the whole answer so far
    (with `langchain`, the sources ride on the first object)."""

    def __init__(self, *, history: list, prompt: str):
        self.history, self.prompt = history, prompt
        self.answer = ""
        self.sources = None  # sent with the first object, then dropped

    def on_sources(self, event: contract.Sources) -> list:
        self.sources = event.sources
        return []

    def on_delta(self, event: contract.Delta) -> list:
        self.answer += event.text
        out = chunk(self.answer, self.history, self.prompt, sources=self.sources)
        self.sources = None
        return [out]

    def on_final(self, event: contract.Final) -> list:
        if event.text == self.answer and self.sources is None:
            return []
        # The last object holds the whole answer: sources with no text, or a final answer that
        # does not continue what the deltas said (the relay sends a continuation as a delta).
        return [chunk(event.text, self.history, self.prompt, sources=self.sources)]

    def on_error(self, event: contract.Error) -> list:
        return [error_chunk(ServerError(event.message).body())]  # the stream began: a server error


class PredictAnswer(Formatter):
    """HTTP, not streamed: one body with the whole answer (or the ApiError to answer with)."""

    def __init__(self, *, history: list, prompt: str, with_sources: bool):
        self.history, self.prompt, self.with_sources = history, prompt, with_sources
        self.sources = []

    def on_sources(self, event: contract.Sources) -> list:
        self.sources = event.sources
        return []

    def on_final(self, event: contract.Final) -> list:
        body = {"response": event.text, "history": [*self.history, [self.prompt, event.text]], "usage": event.usage}
        if self.with_sources:
            body["sources"] = self.sources
        return [body]

    def on_error(self, event: contract.Error) -> list:
        return [api_error(event)]


class PredictSocket(Formatter):
    """WebSocket: text deltas (or the whole answer at once when not streaming), sources only when
    asked for (old clients join every message into the answer); an error raises, and the
    consumer answers it with `{"error": ...}` then `<EOS>`."""

    def __init__(self, *, streaming: bool, return_sources: bool):
        self.streaming, self.return_sources = streaming, return_sources
        self.answer: str | None = None  # the whole answer, once it ended

    def on_sources(self, event: contract.Sources) -> list:
        return [json.dumps({"sources": event.sources}, ensure_ascii=False)] if self.return_sources else []

    def on_delta(self, event: contract.Delta) -> list:
        return [event.text] if self.streaming and event.text else []

    def on_final(self, event: contract.Final) -> list:
        self.answer = event.text
        return [] if self.streaming else [event.text]

    def on_error(self, event: contract.Error) -> list:
        raise api_error(event)
