"""The predict API's wire format (PROTOCOL.md): request bodies in, NUL-delimited JSON out."""

import json
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, StrictStr, ValidationError

from llmsite.errors import InvalidRequest

StrictNumber = Annotated[float, Field(strict=True)]  # strict float still takes 0 and 1


class PredictFields(BaseModel):
    """The fields of a predict request; absent ones take the deployment's defaults."""

    model_config = ConfigDict(extra="ignore")

    prompt: StrictStr | None = None
    system_prompt: StrictStr | None = None
    history: list[Annotated[list[StrictStr | None], Field(min_length=2, max_length=2)]] | None = None
    max_new_tokens: Annotated[StrictInt, Field(ge=1)] | None = None
    temperature: Annotated[StrictNumber, Field(ge=0, le=2)] | None = None
    top_k: Annotated[StrictInt, Field(ge=0)] | None = None
    top_p: Annotated[StrictNumber, Field(gt=0, le=1)] | None = None
    repetition_penalty: Annotated[StrictNumber, Field(gt=0)] | None = None  # > 1 discourages repeats; 1 is off
    do_sample: StrictBool | None = None
    use_cache: StrictBool | None = None
    use_stream_chat: StrictBool | None = None
    langchain: StrictBool | None = None
    knowledge_base: StrictStr | None = None
    return_sources: StrictBool | None = None

    def pairs(self) -> list[list[str]] | None:
        if self.history is None:
            return None
        return [[u or "", a or ""] for u, a in self.history]


def _invalid(exc: ValidationError) -> InvalidRequest:
    err = exc.errors()[0]
    param = str(err["loc"][0]) if err["loc"] else None
    where = ".".join(str(p) for p in err["loc"]) or "body"
    return InvalidRequest(f"{where}: {err['msg']}", param=param)


def fields_from_object(obj: dict) -> PredictFields:
    try:
        return PredictFields.model_validate(obj)
    except ValidationError as exc:
        raise _invalid(exc) from None


def _decode(body: bytes) -> str:
    try:
        return body.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InvalidRequest(f"The body is not valid UTF-8 (byte {exc.start}).", param="body") from None


def _loads(text: str):
    """json.loads, with nesting too deep for the parser (a RecursionError) as just invalid JSON."""
    try:
        return json.loads(text)
    except RecursionError:
        raise ValueError("nested too deeply") from None


def parse_http_body(body: bytes, content_type: str) -> PredictFields:
    """A JSON object, or any other body as the prompt itself (`curl --data-binary @question.txt`)."""
    text = _decode(body)
    declared_json = content_type.split(";")[0].strip().lower() == "application/json"
    try:
        obj = _loads(text)
    except ValueError as exc:
        if declared_json:
            raise InvalidRequest(f"The body is not valid JSON: {exc}", param="body") from None
        return PredictFields(prompt=text)
    if isinstance(obj, dict):
        return fields_from_object(obj)
    if declared_json:
        raise InvalidRequest("The JSON body must be an object with a 'prompt' field.", param="body")
    return PredictFields(prompt=text)


def parse_ws_message(data: str | bytes) -> PredictFields:
    """One WebSocket message: a JSON object of the same fields, or plain text (the prompt)."""
    text = _decode(data) if isinstance(data, bytes) else data
    try:
        obj = _loads(text)
    except ValueError:
        return PredictFields(prompt=text)
    if isinstance(obj, dict):
        return fields_from_object(obj)
    return PredictFields(prompt=text)


def chunk(answer: str, history: list, prompt: str, sources: list | None = None) -> bytes:
    """One object of a streamed answer: the whole answer so far (and, first, any sources), then NUL."""
    obj = {"response": answer, "history": [*history, [prompt, answer]]}
    if sources is not None:
        obj["sources"] = sources
    return json.dumps(obj, ensure_ascii=False).encode() + b"\0"


def error_chunk(body: dict) -> bytes:
    return json.dumps(body, ensure_ascii=False).encode() + b"\0"


class PredictUsage(BaseModel):
    prompt_tokens: int
    completion_tokens: int


class PredictSource(BaseModel):
    document: str
    chunk: int
    score: float
    text: str


class PredictResponse(BaseModel):
    """A non-streamed answer; a streamed one is a series of {response, history} objects, each + NUL."""

    response: str
    history: list[list[str]]
    usage: PredictUsage
    sources: list[PredictSource] | None = None
