"""One relay from a request's typed events to any wire format.

A wire format is a `Formatter`: one method per event type that returns what to send for it
(bytes, text, a dict, a response: whatever its edge sends). `relay` drives a formatter from a
generation's events, so each protocol's module holds only how it writes things.
"""

import logging
from collections.abc import AsyncIterator

from llmsite import contract
from llmsite.errors import ApiError, InvalidRequest, ServerError

log = logging.getLogger(__name__)


class Formatter:
    """How one wire format writes a request's events; each method returns the items to send."""

    def begin(self) -> list:
        """What goes out before any event (an OpenAI stream's first chunk)."""
        return []

    def on_queued(self, event: contract.Queued) -> list:
        """The request waits its turn (only the chat page shows it; other wire formats say nothing)."""
        return []

    def on_received(self, event: contract.Received) -> list:
        """The worker waits for the model to load (only the chat page shows it)."""
        return []

    def on_start(self, event: contract.Start) -> list:
        return []

    def on_sources(self, event: contract.Sources) -> list:
        return []

    def on_delta(self, event: contract.Delta) -> list:
        return []

    def on_final(self, event: contract.Final) -> list:
        return []

    def on_embeddings(self, event: contract.Embeddings) -> list:
        return []

    def on_error(self, event: contract.Error) -> list:
        return []

    def feed(self, event: contract.Event) -> list:
        return getattr(self, f"on_{event.type}")(event)


async def relay(generation, formatter: Formatter) -> AsyncIterator:
    """Yield what `formatter` writes for each of the generation's events, then close the
    generation (a request still running is cancelled: the client is gone).

    The final event is the truth: text it holds beyond what the deltas said goes out as one more
    delta first (a formatter whose objects hold the whole answer so far also sends the final text
    when it does not continue the deltas)."""
    heard: dict[int, list] = {}  # per answer (Delta.index): [its texts, how many logprob entries]
    try:
        for item in formatter.begin():
            yield item
        async for event in generation.events():
            if isinstance(event, contract.Delta):
                texts, _ = heard.setdefault(event.index, [[], 0])
                texts.append(event.text)
                heard[event.index][1] += len(event.logprobs or ())
            elif isinstance(event, contract.Final):
                for item in _missing_tails(event, heard, formatter):
                    yield item
            for item in formatter.feed(event):
                yield item
    finally:
        await generation.close()


def _missing_tails(final: contract.Final, heard: dict, formatter: Formatter) -> list:
    """For each answer, its text (and logprob entries) beyond what its deltas said."""
    answers = final.choices or [{"index": 0, "text": final.text, "logprobs": final.logprobs}]
    out = []
    for answer in answers:
        index = answer.get("index", 0)
        texts, entries = heard.get(index, [[], 0])
        out += _missing_tail(answer["text"], answer.get("logprobs"), index, "".join(texts), entries, formatter)
    return out


def _missing_tail(text: str, logprobs, index: int, heard: str, entries: int, formatter: Formatter) -> list:
    if text == heard:
        return []
    if text.startswith(heard):
        rest = logprobs[entries:] if logprobs else None
        return formatter.on_delta(contract.Delta(text[len(heard) :], index=index, logprobs=rest or None))
    log.warning("a final answer does not continue its deltas (%d chars heard, %d final)", len(heard), len(text))
    return []


async def first(generation, formatter: Formatter):
    """The first item `formatter` writes (a whole answer, a check's verdict); None if none."""
    items = relay(generation, formatter)
    try:
        async for item in items:
            return item
        return None
    finally:
        await items.aclose()


def api_error(event: contract.Error) -> ApiError:
    """An error event as the edge's error: a refusal the worker found (a prompt over the context,
    where the web tier could not count it) is the protocol's 400, anything else a server error."""
    error = InvalidRequest(event.message, param=event.param) if event.kind == "invalid_request" else ServerError(event.message)
    error.counted = True  # in /metrics by the worker that ended the request (or the stream's own end)
    return error
