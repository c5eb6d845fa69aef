"""The OpenAI API's decoding fields (penalties, logit_bias, logprobs, n, response_format) and the
shapes their answers take (chat's and the legacy completions' logprobs).

`chat.protocols.openai` builds its requests and choices from these; `decoding()` maps a request's
fields onto the contract's SamplingParams (response_format compiled by chat.structured).
"""

from typing import Annotated, Literal

from django.conf import settings
from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator

from chat import structured

Penalty = Annotated[float, Field(ge=-2, le=2)]
Bias = Annotated[float, Field(ge=-100, le=100)]


class _Request(BaseModel):
    model_config = ConfigDict(extra="ignore", populate_by_name=True)


class JsonSchemaFormat(_Request):
    name: Annotated[str, Field(pattern=r"^[a-zA-Z0-9_-]{1,64}$")]
    description: str | None = None
    schema_: dict | bool | None = Field(default=None, alias="schema", description="A JSON schema; absent: any JSON.")
    strict: bool | None = None


class ResponseFormatText(_Request):
    type: Literal["text"]


class ResponseFormatJsonObject(_Request):
    type: Literal["json_object"]


class ResponseFormatJsonSchema(_Request):
    type: Literal["json_schema"]
    json_schema: JsonSchemaFormat


ResponseFormat = Annotated[
    ResponseFormatText | ResponseFormatJsonObject | ResponseFormatJsonSchema, Field(discriminator="type")
]


class DecodingFields(_Request):
    """The decoding fields chat and text completions share."""

    frequency_penalty: Penalty | None = None
    presence_penalty: Penalty | None = None
    repetition_penalty: Annotated[float, Field(gt=0)] | None = Field(
        default=None, description="Extension (as vLLM's): > 1 discourages tokens already in the prompt or answer; 1 is off."
    )
    logit_bias: dict[str, Bias] | None = Field(default=None, description="Token id -> a bias (-100..100) added to its logit.")
    n: Annotated[int, Field(ge=1)] | None = Field(default=None, description="How many answers (at most OPENAI_MAX_N, 8 by default).")
    response_format: ResponseFormat | None = Field(
        default=None, description="`json_object`: any JSON object; `json_schema`: JSON valid against the schema (constrained decoding)."
    )

    @field_validator("n")
    @classmethod
    def _at_most_max_n(cls, n):
        if n is not None and n > settings.OPENAI_MAX_N:
            raise ValueError(f"at most {settings.OPENAI_MAX_N} answers per request (OPENAI_MAX_N)")
        return n

    @field_validator("logit_bias")
    @classmethod
    def _token_ids(cls, bias):
        for key in bias or {}:
            if not key.isascii() or not key.isdigit():
                raise ValueError(f"keys must be token ids (non-negative integers), got {key!r}")
        return bias

    def uses_decoding(self) -> bool:
        """Whether the request sets any of these fields (most set none: no checks to make)."""
        names = set(DecodingFields.model_fields) | {"logprobs", "top_logprobs"}
        return any(getattr(self, name, None) is not None for name in names)

    def logprob_fields(self) -> dict:
        return {}

    def decoding(self) -> dict:
        """The contract's SamplingParams values these fields set (absent ones: not set)."""
        values = {
            "frequency_penalty": self.frequency_penalty,
            "presence_penalty": self.presence_penalty,
            "repetition_penalty": self.repetition_penalty,
            "logit_bias": {str(int(k)): v for k, v in self.logit_bias.items()} if self.logit_bias else None,
            "n": self.n,
            "grammar": self.grammar(),
            **self.logprob_fields(),
        }
        return {k: v for k, v in values.items() if v is not None}

    def grammar(self) -> str | None:
        fmt = self.response_format
        if fmt is None:
            return None
        return structured.grammar_for(fmt.type, fmt.json_schema.schema_ if fmt.type == "json_schema" else None) or None


class ChatLogprobFields(DecodingFields):
    logprobs: bool | None = Field(default=None, description="Return each answer token's log-probability (the model's raw ones).")
    top_logprobs: Annotated[int, Field(ge=0, le=20)] | None = Field(
        default=None, description="And this many most likely tokens at each position (needs `logprobs: true`)."
    )

    @field_validator("top_logprobs")
    @classmethod
    def _top_needs_logprobs(cls, top, info: ValidationInfo):
        if top and not info.data.get("logprobs"):
            raise ValueError("needs logprobs: true")
        return top

    def logprob_fields(self) -> dict:
        return {"logprobs": True, "top_logprobs": self.top_logprobs or 0} if self.logprobs else {}


class CompletionLogprobFields(DecodingFields):
    logprobs: Annotated[int, Field(ge=0, le=5)] | None = Field(
        default=None, description="Return each token's log-probability and this many most likely tokens at each position."
    )

    def logprob_fields(self) -> dict:
        return {"logprobs": True, "top_logprobs": self.logprobs} if self.logprobs is not None else {}


# --- answers ----------------------------------------------------------------------------------


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob] = Field(default_factory=list)


class ChatLogprobs(BaseModel):
    """A chat choice's `logprobs`: one entry per answer token, most likely alternatives first."""

    content: list[TokenLogprob] | None = None
    refusal: list[TokenLogprob] | None = None


class CompletionLogprobs(BaseModel):
    """The legacy completions `logprobs`: parallel lists, `text_offset` counting from the text's start."""

    tokens: list[str] = Field(default_factory=list)
    token_logprobs: list[float] = Field(default_factory=list)
    top_logprobs: list[dict[str, float]] = Field(default_factory=list)
    text_offset: list[int] = Field(default_factory=list)


def chat_logprobs(entries: list | None) -> ChatLogprobs | None:
    return None if entries is None else ChatLogprobs(content=[TokenLogprob(**e) for e in entries])


def completion_logprobs(entries: list | None, offset: int = 0) -> CompletionLogprobs | None:
    """The legacy shape of contract logprob entries whose text starts at character `offset`."""
    if entries is None:
        return None
    out = CompletionLogprobs()
    for entry in entries:
        out.tokens.append(entry["token"])
        out.token_logprobs.append(entry["logprob"])
        top = {t["token"]: t["logprob"] for t in entry.get("top_logprobs") or []}
        out.top_logprobs.append(top or {entry["token"]: entry["logprob"]})
        out.text_offset.append(offset)
        offset += len(entry["token"])
    return out
