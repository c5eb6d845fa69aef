"""The Responses API's wire format (`/v1/responses`): its typed request and answer, as OpenAI's
reference and the `openai` package's `types/responses` name them.

A request is translated into the chat completions request it amounts to (chat/responses.py), so
both share one validation, dispatch and token stream. Unknown request fields are ignored.
"""

from typing import Annotated, Literal

from pydantic import BaseModel, Field

from chat.protocols.openai import MaxTokens, Request, Temperature, TopP


class InputText(Request):
    """A text part of an input message (`output_text`: an earlier answer's part, sent back)."""

    type: Literal["input_text", "output_text"]
    text: str


class InputMessage(Request):
    type: Literal["message"] | None = None
    role: Literal["user", "assistant", "system", "developer"]
    content: str | list[InputText]

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(part.text for part in self.content)


class FunctionCallInput(Request):
    """A function call the model made earlier, sent back with its output for the next turn."""

    type: Literal["function_call"]
    call_id: str
    name: str
    arguments: str


class FunctionCallOutputInput(Request):
    type: Literal["function_call_output"]
    call_id: str
    output: str


InputItem = Annotated[InputMessage | FunctionCallInput | FunctionCallOutputInput, Field(union_mode="left_to_right")]


class FunctionTool(Request):
    type: Literal["function"]
    name: str
    description: str | None = None
    parameters: dict | None = None
    strict: bool | None = None


class TextFormat(Request):
    """`{"type": "text"}`, `{"type": "json_object"}` or `{"type": "json_schema", "name", "schema", "strict"}`."""

    type: Literal["text", "json_object", "json_schema"] = "text"
    name: str | None = None
    schema_: dict | None = Field(default=None, alias="schema")
    description: str | None = None
    strict: bool | None = None


class TextConfig(Request):
    format: TextFormat = Field(default_factory=TextFormat)


class ResponsesRequest(Request):
    model: str = Field(description="The deployment's name, as for /v1/chat/completions.")
    input: str | Annotated[list[InputItem], Field(min_length=1)]
    instructions: str | None = Field(default=None, description="A system message first; not carried on by previous_response_id.")
    previous_response_id: str | None = Field(default=None, description="Continue a stored response: its inputs and outputs come first.")
    store: bool = Field(default=True, description="Keep the response (per user, in the database) for GET and previous_response_id.")
    stream: bool | None = False
    temperature: Temperature | None = None
    top_p: TopP | None = None
    max_output_tokens: MaxTokens | None = None
    text: TextConfig | None = None
    tools: list[FunctionTool] | None = None
    tool_choice: Literal["none", "auto", "required"] | dict | None = None
    parallel_tool_calls: bool | None = None
    seed: int | None = None
    frequency_penalty: float | None = None
    presence_penalty: float | None = None
    repetition_penalty: float | None = Field(default=None, description="Extension, as on /v1/chat/completions.")
    metadata: dict | None = None


# --- the answer -----------------------------------------------------------------------------

Status = Literal["completed", "incomplete", "failed", "in_progress"]


class OutputText(BaseModel):
    type: Literal["output_text"] = "output_text"
    text: str
    annotations: list = Field(default_factory=list)


class OutputMessage(BaseModel):
    type: Literal["message"] = "message"
    id: str
    role: Literal["assistant"] = "assistant"
    status: Literal["in_progress", "completed", "incomplete"]
    content: list[OutputText]


class FunctionCall(BaseModel):
    type: Literal["function_call"] = "function_call"
    id: str
    call_id: str
    name: str
    arguments: str
    status: Literal["in_progress", "completed", "incomplete"] = "completed"


OutputItem = Annotated[OutputMessage | FunctionCall, Field(discriminator="type")]


class InputTokensDetails(BaseModel):
    cached_tokens: int = Field(0, description="Input tokens whose KV cache rows the engine had kept (as chat completions' cached_tokens).")
    cache_write_tokens: int = 0


class OutputTokensDetails(BaseModel):
    reasoning_tokens: int = 0


class ResponseUsage(BaseModel):
    input_tokens: int
    input_tokens_details: InputTokensDetails = Field(default_factory=InputTokensDetails)
    output_tokens: int
    output_tokens_details: OutputTokensDetails = Field(default_factory=OutputTokensDetails)
    total_tokens: int


class ResponseError(BaseModel):
    code: str
    message: str


class IncompleteDetails(BaseModel):
    reason: Literal["max_output_tokens"] = "max_output_tokens"


class ResponseObject(BaseModel):
    """A response (`POST` and `GET /v1/responses/{id}`); the `openai` client adds `output_text`."""

    id: str
    object: Literal["response"] = "response"
    created_at: int
    status: Status
    model: str
    output: list[OutputItem]
    usage: ResponseUsage | None = None
    error: ResponseError | None = None
    incomplete_details: IncompleteDetails | None = None
    instructions: str | None = None
    previous_response_id: str | None = None
    temperature: float | None = None
    top_p: float | None = None
    max_output_tokens: int | None = None
    text: dict = Field(default_factory=lambda: {"format": {"type": "text"}})
    tools: list[dict] = Field(default_factory=list)
    tool_choice: str | dict = "auto"
    parallel_tool_calls: bool = True
    store: bool = True
    metadata: dict = Field(default_factory=dict)


class DeletedResponse(BaseModel):
    id: str
    object: Literal["response"] = "response"
    deleted: bool = True
