"""The contract between the web tier and the workers: the one request a worker is sent, and the
typed events that come back on the request's stream.

Both tiers import this module, and so does bench/gpu_check.py on a machine with only torch and
transformers: it imports nothing but the standard library (no Django, no Celery, no pydantic).
On the wire a request is the dict of `GenerationRequest.to_wire()` (the Celery task's kwargs) and
an event is one JSON object with a "type" (`encode` / `decode`).
"""

from __future__ import annotations

import dataclasses
import json
import logging
from dataclasses import asdict, dataclass, field
from typing import Any, ClassVar, Union

log = logging.getLogger(__name__)

# Raised when a field is added that an older worker must not ignore; a worker refuses a request
# of a newer version than its own with an error event instead of answering it wrongly. Version 2
# is the first typed request (before it, tasks carried `params` and no `version`: a worker and a
# web tier of different sides of that change cannot talk; upgrade both together).
# Version 3 added the decoding fields (penalties, logit_bias, logprobs, n, grammar) and `tools`:
# a version-2 worker would ignore a grammar and answer unconstrained, so it refuses them.
PROTOCOL_VERSION = 3


class ContractError(ValueError):
    """A request or event that breaks the contract (a missing or mistyped field); the message
    names the field."""


# --- the request ------------------------------------------------------------------------------


@dataclass
class SamplingParams:
    max_new_tokens: int
    temperature: float
    top_k: int
    top_p: float
    do_sample: bool
    use_cache: bool = True
    seed: int | None = None
    stop: list[str] = field(default_factory=list)  # the answer ends before the first of these
    # OpenAI's penalties: subtracted from a token's logit per occurrence in the answer so far
    # (frequency) and once if it occurred at all (presence); repetition_penalty (transformers'
    # and vLLM's) divides positive / multiplies negative logits of tokens in prompt and answer.
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: dict = field(default_factory=dict)  # token id (a string: JSON keys) -> added to its logit
    logprobs: bool = False  # report each chosen token's raw log-probability (before any processing)
    top_logprobs: int = 0  # and this many most likely tokens at each step, most likely first
    n: int = 1  # independent answers to the one prompt (Delta.index names which)
    # An llguidance grammar (its JSON "top-level grammar" text, as chat.structured compiles it in
    # the web tier) the answer must match, enforced by masking logits at every step; "" for none.
    grammar: str = ""

    @property
    def greedy(self) -> bool:
        return not self.do_sample or self.temperature == 0

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass
class PromptFormat:
    """How the deployment renders a conversation, as the web tier read it for this request."""

    model_type: str = "auto"
    chat_template: str = ""
    context_length: int | None = None


@dataclass
class GenerationRequest:
    """Everything a worker needs for one generation, and the only thing the web tier sends.

    `prompt_ids` are the rendered prompt's tokens, counted and checked against the context by the
    web tier (chat.prompting.fit_prompt); None where the web tier had no tokenizer yet, or where
    the worker must ground the messages in a knowledge base first: the worker fits them then.
    """

    request_id: str
    deployment: str
    messages: list[dict]
    sampling: SamplingParams
    prompt_format: PromptFormat = field(default_factory=PromptFormat)
    prompt_ids: list[int] | None = None
    tokenizer_digest: str = ""  # which tokenizer files counted prompt_ids (the worker refits on another)
    knowledge_base: int | None = None  # langchain: the knowledge base's id, searched on the worker
    cache_scope: str = ""  # KV rows kept by the engine are shared only within one scope
    tools: list[dict] = field(default_factory=list)  # OpenAI function tools, for the chat template's `tools=`
    sent_at: float | None = None  # when the web tier sent it (epoch seconds): the queue time in /metrics
    version: int = PROTOCOL_VERSION

    def to_wire(self) -> dict:
        """The task's kwargs, checked as the worker will check them (a sender's bug fails here,
        before anything is queued)."""
        wire = asdict(self)
        GenerationRequest.from_wire(wire)
        return wire

    @classmethod
    def from_wire(cls, data: dict) -> GenerationRequest:
        """Validate a request from the queue: unknown fields (a newer web tier) are logged and
        ignored; a missing or mistyped required one raises ContractError naming it."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            log.warning("request %s: fields this worker does not know ignored: %s", data.get("request_id"), unknown)
        values = {k: v for k, v in data.items() if k in known}
        for name in ("request_id", "deployment", "messages", "sampling"):
            if name not in values:
                raise ContractError(f"{name}: missing")
        values["sampling"] = _build(SamplingParams, values["sampling"], "sampling", log_unknown=True)
        values["prompt_format"] = _build(PromptFormat, values.get("prompt_format") or {}, "prompt_format", log_unknown=True)
        _check_types(cls, values, "")
        if not all(isinstance(m, dict) and isinstance(m.get("role"), str) for m in values["messages"]):
            raise ContractError("messages: each message must be an object with a 'role'")
        sent_at = values.get("sent_at")
        if sent_at is not None and (isinstance(sent_at, bool) or not isinstance(sent_at, (int, float))):
            raise ContractError("sent_at: must be a number (epoch seconds)")
        ids = values.get("prompt_ids")
        if ids is not None and not all(_is(i, int) for i in ids):
            raise ContractError("prompt_ids: must be a list of token ids")
        request = cls(**values)
        if request.version > PROTOCOL_VERSION:
            raise ContractError(f"version: this worker speaks version {PROTOCOL_VERSION}, the request {request.version!r}")
        return request


# The field types the contract uses, as `from __future__ import annotations` writes them.
_TYPES: dict[str, tuple] = {
    "str": (str,),
    "int": (int,),
    "float": (int, float),
    "bool": (bool,),
    "dict": (dict,),
    "list": (list,),
    "list[str]": (list,),
    "list[int]": (list,),
    "list[dict]": (list,),
    "int | None": (int, type(None)),
    "list[int] | None": (list, type(None)),
    "str | None": (str, type(None)),
    "list | None": (list, type(None)),
    "float | None": (int, float, type(None)),
}


def _is(value, kinds) -> bool:
    kinds = kinds if isinstance(kinds, tuple) else (kinds,)
    if isinstance(value, bool) and bool not in kinds:
        return False  # JSON's true is not a count
    return isinstance(value, kinds)


def _check_types(kind: type, values: dict, where: str) -> None:
    for f in dataclasses.fields(kind):
        if f.name in values and f.type in _TYPES and not _is(values[f.name], _TYPES[f.type]):
            raise ContractError(f"{where}{f.name}: expected {f.type}, got {type(values[f.name]).__name__}")


def _build(kind: type, data: Any, where: str, log_unknown: bool = False):
    """A dataclass from a dict, naming the field that is missing or mistyped."""
    if not isinstance(data, dict):
        raise ContractError(f"{where}: expected an object")
    names = {f.name for f in dataclasses.fields(kind)}
    if log_unknown and set(data) - names:
        log.warning("%s: fields this worker does not know ignored: %s", where, sorted(set(data) - names))
    values = {k: v for k, v in data.items() if k in names}
    _check_types(kind, values, f"{where}.")
    try:
        return kind(**values)
    except TypeError as exc:
        raise ContractError(f"{where}: {exc}") from None


# --- the events -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Received:
    """A worker holds the request (the web tier watches that worker). Said again while the request
    waits for its deployment's model to load, so that the wait is not taken for silence, with
    `loading_seconds` (how long it has waited so far): those the web tier relays (the chat page
    shows the load), the others not."""

    worker: str = ""
    loading_seconds: float | None = None
    type: ClassVar[str] = "received"


@dataclass(frozen=True)
class Queued:
    """The request waits for its turn: `position` requests start before it (0: it is next), and
    `wait_seconds` estimates when it starts (None where nothing yet tells)."""

    position: int
    wait_seconds: float | None = None
    type: ClassVar[str] = "queued"


@dataclass(frozen=True)
class Start:
    """A worker took the request and started on it."""

    worker: str = ""
    type: ClassVar[str] = "start"


@dataclass(frozen=True)
class Sources:
    """The knowledge base's chunks the answer draws on, best first, before the answer."""

    sources: list
    type: ClassVar[str] = "sources"


@dataclass(frozen=True)
class Delta:
    """New text of answer `index` (0 unless the request asked for n > 1), with the log-probabilities
    of its tokens where the request asked for them: one {"token", "logprob", "bytes",
    "top_logprobs": [{"token", "logprob", "bytes"}, ...]} per token, as OpenAI's chat logprobs."""

    text: str
    index: int = 0
    logprobs: list | None = None
    type: ClassVar[str] = "delta"


@dataclass(frozen=True)
class Final:
    """The end of an answer: its whole text (the truth, whatever deltas were heard), why it
    ended ("stop", "length" or "cancelled") and its token counts."""

    text: str
    finish_reason: str
    usage: dict = field(default_factory=lambda: {"prompt_tokens": 0, "completion_tokens": 0})
    cached_tokens: int = 0
    logprobs: list | None = None  # every token's entry (as Delta's), where the request asked
    # n > 1: one {"index", "text", "finish_reason", "logprobs"} per answer; `text` and
    # `finish_reason` above are answer 0's, `usage` counts all of them.
    choices: list | None = None
    type: ClassVar[str] = "final"

    @property
    def total_tokens(self) -> int:
        return sum(v or 0 for v in self.usage.values())


@dataclass(frozen=True)
class Embeddings:
    """The end of an embedding request: unit-length vectors and the tokens they took."""

    vectors: list
    tokens: int
    type: ClassVar[str] = "embeddings"


@dataclass(frozen=True)
class Error:
    """The request failed. `kind` "invalid_request" (with `param`) is a refusal a protocol may
    still answer as its 400 (a prompt over the context found by the worker); "server_error" is
    a failure."""

    message: str
    kind: str = "server_error"
    param: str | None = None
    type: ClassVar[str] = "error"


Event = Union[Received, Queued, Start, Sources, Delta, Final, Embeddings, Error]
EVENT_TYPES: dict[str, type] = {
    cls.type: cls for cls in (Received, Queued, Start, Sources, Delta, Final, Embeddings, Error)
}
TERMINAL = (Final, Embeddings, Error)  # every stream ends with exactly one of these


def encode(event: Event) -> str:
    return json.dumps({"type": event.type, **asdict(event)}, ensure_ascii=False)


def decode(data: str | bytes) -> Event:
    """An event from the stream; a malformed one raises ContractError naming what is wrong."""
    try:
        obj = json.loads(data)
    except ValueError as exc:
        raise ContractError(f"event: not JSON ({exc})") from None
    if not isinstance(obj, dict) or obj.get("type") not in EVENT_TYPES:
        raise ContractError(f"event: unknown type {obj.get('type') if isinstance(obj, dict) else obj!r}")
    kind = EVENT_TYPES[obj.pop("type")]
    return _build(kind, obj, f"{kind.type} event")


# --- the answer's text on the worker -----------------------------------------------------------


class StopText:
    """Cuts a streamed answer before the first stop sequence, holding back text that may start one."""

    def __init__(self, stops: list[str] | None):
        self.stops = [s for s in stops or [] if s]
        self.hold = max((len(s) for s in self.stops), default=1) - 1
        self.text = ""  # the whole answer so far, stop sequence excluded once hit
        self.sent = 0
        self.hit = False

    def feed(self, delta: str) -> str:
        """The new text that is safe to send after `delta` arrived."""
        if self.hit:
            return ""
        self.text += delta
        cuts = [i for i in (self.text.find(s, max(0, self.sent - len(s))) for s in self.stops) if i >= 0]
        if cuts:
            self.hit = True
            self.text = self.text[: min(cuts)]
            ready = len(self.text)
        else:
            ready = max(self.sent, len(self.text) - self.hold)
        out, self.sent = self.text[self.sent : ready], ready
        return out

    def flush(self) -> str:
        """What was held back, once the answer ended without a stop sequence."""
        out, self.sent = self.text[self.sent :], len(self.text)
        return out
