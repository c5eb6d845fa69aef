"""The OpenAI-compatible wire format: typed requests and responses, and their translation.

Requests are validated at the edge (django-ninja validates the body with these classes and
publishes them in the OpenAPI schema); the rest of the code gets a `Conversation` and the same
`PredictFields` that the predict API builds, so both protocols share one dispatch and token stream.
Unknown request fields are ignored, as OpenAI does.
"""

import base64
import time
from typing import Annotated, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, model_serializer

from llmsite.errors import ApiError, Forbidden, InvalidRequest, RateLimited, UnknownDeployment
from chat.tools import ToolPlan, plan_tools, template_messages
from chat.protocols.openai_tools import NamedToolChoice, Tool, ToolCall, ToolCallDelta
from chat.generation import Conversation
from chat.protocols.openai_decoding import ChatLogprobFields, ChatLogprobs, CompletionLogprobFields, CompletionLogprobs
from chat.protocols.predict import PredictFields

Temperature = Annotated[float, Field(ge=0, le=2)]
TopP = Annotated[float, Field(ge=0, le=1)]
MaxTokens = Annotated[int, Field(ge=1)]
Stop = str | Annotated[list[str], Field(max_length=4)]


class Request(BaseModel):
    model_config = ConfigDict(extra="ignore")


class StreamOptions(Request):
    include_usage: bool = False


class TextPart(Request):
    type: Literal["text"]
    text: str


class ChatMessage(Request):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None  # accepted and not used: the chat template has no place for it
    tool_calls: list[ToolCall] | None = Field(default=None, description="An assistant turn's calls.")
    tool_call_id: str | None = Field(default=None, description="A tool turn: the call it answers.")

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(part.text for part in self.content)
        return self.content or ""


class Sampling(Request):
    """The sampling fields chat and text completions share; absent ones take the deployment's defaults."""

    model: str
    temperature: Temperature | None = None
    top_p: TopP | None = None
    max_tokens: MaxTokens | None = None
    stop: Stop | None = None
    seed: Annotated[int, Field(ge=-(2**63), le=2**63 - 1)] | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None

    def predict_fields(self, max_tokens: int | None, **extra) -> PredictFields:
        greedy = self.top_p == 0
        return PredictFields(
            max_new_tokens=max_tokens,
            temperature=self.temperature,
            top_p=None if greedy else self.top_p,
            do_sample=False if greedy else None,
            **extra,
        )

    def stops(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class ChatCompletionRequest(ChatLogprobFields, Sampling):
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    max_completion_tokens: MaxTokens | None = None
    knowledge_base: str | None = Field(
        default=None, description="Extension: answer from this knowledge base (as predict's `langchain: true`)."
    )
    tools: Annotated[list[Tool], Field(max_length=128)] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = Field(
        default=None,
        description="`required` and a named function are constrained (always valid calls); `auto` needs a model "
        "whose chat template has a tool format. Default: `auto` with tools, else `none`.",
    )
    parallel_tool_calls: bool | None = None
    _tool_plan: ToolPlan | None = PrivateAttr(default=None)  # set by plan_tools

    @property
    def tool_plan(self) -> ToolPlan | None:
        return self._tool_plan

    def fields(self) -> PredictFields:
        extra = {"langchain": True, "knowledge_base": self.knowledge_base} if self.knowledge_base else {}
        return self.predict_fields(self.max_completion_tokens or self.max_tokens, **extra)

    def conversation(self) -> Conversation:
        """All messages as given (two system messages in a row, or a trailing assistant turn, are fine)."""
        messages = template_messages([_message(m) for m in self.messages])
        last_user = next((m["content"] for m in reversed(messages) if m["role"] == "user"), "")
        system = "\n".join(m["content"] for m in messages if m["role"] == "system")
        conversation = Conversation(prompt=last_user, system_prompt=system, history=messages[:-1], raw_messages=messages)
        conversation.tools = self.tool_plan.tools if self.tool_plan else []
        return conversation

    def plan_tools(self, template: str | None) -> ToolPlan:
        """How this request uses its tools (checked: a 400 naming the field), kept for its answer."""
        self._tool_plan = plan_tools(
            tools=[t.model_dump(exclude_none=True) for t in self.tools or []],
            tool_choice=self.tool_choice.model_dump() if isinstance(self.tool_choice, BaseModel) else self.tool_choice,
            parallel=self.parallel_tool_calls,
            template=template,
            model=self.model,
        )
        return self._tool_plan


def _message(m: ChatMessage) -> dict:
    message = {"role": "system" if m.role == "developer" else m.role, "content": m.text()}
    if m.tool_calls:
        message["tool_calls"] = [call.model_dump() for call in m.tool_calls]
    if m.role == "tool":
        message["tool_call_id"] = m.tool_call_id
    return message


class CompletionRequest(CompletionLogprobFields, Sampling):
    prompt: str | Annotated[list[str], Field(min_length=1, max_length=1)]
    echo: bool = False

    def text(self) -> str:
        return self.prompt if isinstance(self.prompt, str) else self.prompt[0]

    def fields(self) -> PredictFields:
        return self.predict_fields(self.max_tokens)

    def conversation(self) -> Conversation:
        # The worker takes messages: the prompt is one user turn through the model's chat template.
        return Conversation(prompt=self.text())


class EmbeddingRequest(Request):
    model: str
    input: str | Annotated[list[str], Field(min_length=1, max_length=2048)]
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: Annotated[int, Field(ge=1)] | None = None

    def texts(self) -> list[str]:
        texts = [self.input] if isinstance(self.input, str) else self.input
        for i, text in enumerate(texts):
            if not text:
                raise InvalidRequest(f"input[{i}] is empty: every input must have text.", param="input")
        return texts


# --- responses ------------------------------------------------------------------------------

FinishReason = Literal["stop", "length", "tool_calls"]


class PromptTokensDetails(BaseModel):
    cached_tokens: int = Field(0, description="Prompt tokens whose KV cache rows the engine had kept from earlier requests (not computed again).")


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails = Field(default_factory=PromptTokensDetails)


class Source(BaseModel):
    document: str
    chunk: int
    score: float
    text: str


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None
    tool_calls: list[ToolCall] | None = None


class ChatChoice(BaseModel):
    index: int = 0
    message: AssistantMessage
    finish_reason: FinishReason
    logprobs: ChatLogprobs | None = None


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage
    sources: list[Source] | None = Field(default=None, description="Extension: with `knowledge_base`, best first.")


class Delta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None
    tool_calls: list[ToolCallDelta] | None = None

    @model_serializer(mode="wrap")
    def _without_absent_calls(self, handler):
        out = handler(self)  # chunks that carry no calls say nothing of them, as OpenAI's
        if out.get("tool_calls") is None:
            out.pop("tool_calls", None)
        return out


class ChatChunkChoice(BaseModel):
    index: int = 0
    delta: Delta
    finish_reason: FinishReason | None = None
    logprobs: ChatLogprobs | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None


class CompletionChoice(BaseModel):
    index: int = 0
    text: str
    finish_reason: FinishReason | None = None
    logprobs: CompletionLogprobs | None = None


class Completion(BaseModel):
    """A text completion, and each streamed chunk of one (same object, `text` a delta)."""

    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class Embedding(BaseModel):
    object: Literal["embedding"] = "embedding"
    index: int
    embedding: list[float] | str = Field(description="Floats, or base64 of little-endian float32.")


class EmbeddingUsage(BaseModel):
    prompt_tokens: int
    total_tokens: int


class EmbeddingList(BaseModel):
    object: Literal["list"] = "list"
    data: list[Embedding]
    model: str
    usage: EmbeddingUsage


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorBody(BaseModel):
    error: ErrorDetail


# --- translation ----------------------------------------------------------------------------


def usage(final) -> Usage:
    """The usage of a generation's final event, with how many prompt tokens came from its engine's
    cache as OpenAI's `prompt_tokens_details.cached_tokens` (0 where the worker does not say)."""
    counts = final.usage or {}
    prompt, completion = counts.get("prompt_tokens") or 0, counts.get("completion_tokens") or 0
    details = PromptTokensDetails(cached_tokens=final.cached_tokens or 0)
    return Usage(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion, prompt_tokens_details=details)


def finish_reason(reason: str) -> FinishReason:
    return reason if reason in ("length", "tool_calls") else "stop"


def now() -> int:
    return int(time.time())


def encode_embedding(vector: list[float], encoding_format: str) -> list[float] | str:
    if encoding_format == "base64":
        return base64.b64encode(np.asarray(vector, dtype="<f4").tobytes()).decode("ascii")
    return vector


_CODES = {401: "invalid_api_key", 404: "model_not_found", 413: "request_too_large", 429: "rate_limit_exceeded"}


def error_body(exc: ApiError) -> dict:
    """OpenAI's error shape: `model` is the parameter that names a deployment here."""
    param = "model" if isinstance(exc, (UnknownDeployment, Forbidden)) and exc.param == "deployment" else exc.param
    code = exc.code if hasattr(exc, "code") else _CODES.get(exc.status)  # an error class may name its own
    return ErrorBody(error=ErrorDetail(message=exc.message, type=exc.type, param=param, code=code)).model_dump()


def retry_after(exc: ApiError) -> int | None:
    return exc.retry_after if isinstance(exc, RateLimited) else None
