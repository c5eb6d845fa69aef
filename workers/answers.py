"""One answer of a generation as it streams: its text cut at a stop string, the engine's counts,
and its token entries (logprobs) published with the text they belong to."""

from dataclasses import dataclass, field
from datetime import datetime

from llmsite.contract import GenerationRequest, StopText
from workers.engines import GenerationResult


@dataclass
class Answer:
    """What one answer has produced so far: its text (cut at a stop string), the engine's
    counts, and when its first token came; `index` is which of the request's n answers it is."""

    stopper: StopText = field(default_factory=lambda: StopText([]))
    result: GenerationResult = field(default_factory=GenerationResult)
    first_token_at: datetime | None = None
    index: int = 0
    logprobs_sent: int = 0  # result.logprobs entries already published with a delta


def unsent_logprobs(request: GenerationRequest, answer: Answer) -> list | None:
    """The answer's token entries not yet published, where the request asked for logprobs."""
    if not request.sampling.logprobs:
        return None
    entries = kept_logprobs(answer)[answer.logprobs_sent :]
    answer.logprobs_sent += len(entries)
    return entries or None


def kept_logprobs(answer: Answer) -> list:
    """The answer's token entries, without those past a stop string that cut it."""
    entries = answer.result.logprobs
    if not answer.stopper.hit:
        return entries
    kept, length = [], 0
    for entry in entries:
        if length >= len(answer.stopper.text):
            break
        kept.append(entry)
        length += len(entry["token"])
    return kept
