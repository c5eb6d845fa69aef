"""The typed HTTP APIs in one django-ninja app: /v1 (OpenAI-compatible), their OpenAPI schema at
`/api/schema/` and its docs page at `/api/docs/`; predict's entry is added from its own classes.

Errors of every kind leave here in OpenAI's shape; predict keeps its own view (plain-text bodies,
NUL-delimited streams) and is only described here.
"""

import logging

from django.core.exceptions import RequestDataTooBig
from django.conf import settings
from ninja import NinjaAPI
from ninja.errors import HttpError, ValidationError

from llmsite import metrics
from llmsite.errors import ApiError, BodyTooLarge, InvalidRequest, ServerError, reason_for_status
from chat.openai_views import router as openai_router
from chat.responses_views import router as responses_router
from chat.protocols import openai as wire
from chat.protocols.predict import PredictFields, PredictResponse

log = logging.getLogger(__name__)


class SiteApi(NinjaAPI):
    def get_openapi_schema(self, *, path_prefix=None, path_params=None):
        schema = super().get_openapi_schema(path_prefix=path_prefix, path_params=path_params)
        _add_predict(schema)
        return schema


api = SiteApi(
    title="llmsite",
    version="1",
    description="The predict API (PROTOCOL.md) and the OpenAI-compatible API of the same deployments.",
    openapi_url="/api/schema/",
    docs_url="/api/docs/",
    urls_namespace="api",
)
api.add_router("", openai_router)
api.add_router("", responses_router)


# The generation endpoints, whose refusals /metrics counts (not /v1/models' or /v1/embeddings').
GENERATION_PATHS = ("/v1/chat/completions", "/v1/completions", "/v1/responses")


def _error(request, exc: ApiError):
    if request.path in GENERATION_PATHS:
        metrics.refused(exc)
    response = api.create_response(request, wire.error_body(exc), status=exc.status)
    if (seconds := wire.retry_after(exc)) is not None:
        response["Retry-After"] = str(seconds)
    if exc.request_id:
        response["X-Request-Id"] = exc.request_id
    return response


def _invalid(request, exc: ValidationError):
    first = exc.errors[0]
    loc = [str(p) for p in first.get("loc", ()) if p not in ("body",)]
    where = ".".join(loc) or "body"
    return _error(request, InvalidRequest(f"{where}: {first.get('msg', 'invalid value')}", param=loc[0] if loc else "body"))


def _http_error(request, exc: HttpError):
    if isinstance(exc.__cause__, RequestDataTooBig):
        return _error(request, BodyTooLarge(settings.DATA_UPLOAD_MAX_MEMORY_SIZE))
    if exc.status_code == 400:
        return _error(request, InvalidRequest("The body is not valid JSON.", param="body"))
    error = ApiError(exc.message)
    error.status, error.reason = exc.status_code, reason_for_status(exc.status_code)
    return _error(request, error)


def _too_big(request, exc: RequestDataTooBig):
    """Django refuses to read a body over DATA_UPLOAD_MAX_MEMORY_SIZE: that is the client's 413."""
    return _error(request, BodyTooLarge(settings.DATA_UPLOAD_MAX_MEMORY_SIZE))


def _unexpected(request, exc: Exception):
    log.exception("unexpected error in %s", request.path)
    return _error(request, ServerError(f"Internal error: {type(exc).__name__}"))


api.add_exception_handler(ApiError, _error)
api.add_exception_handler(ValidationError, _invalid)
api.add_exception_handler(HttpError, _http_error)
api.add_exception_handler(RequestDataTooBig, _too_big)
api.add_exception_handler(Exception, _unexpected)


def _component(schema: dict, model) -> dict:
    body = model.model_json_schema(ref_template="#/components/schemas/{model}")
    for name, sub in body.pop("$defs", {}).items():
        schema["components"]["schemas"].setdefault(name, sub)
    schema["components"]["schemas"][model.__name__] = body
    return {"$ref": f"#/components/schemas/{model.__name__}"}


def _add_predict(schema: dict) -> None:
    """`POST /api/predict/{deployment}`, described from the classes its view validates with."""
    schema.setdefault("components", {}).setdefault("schemas", {})
    security = [{name: []} for name in schema["components"].get("securitySchemes", {})]
    error = {"content": {"application/json": {"schema": _component(schema, wire.ErrorBody)}}}
    stream = {"type": "string", "description": "`{response, history}` JSON objects (`response` cumulative), each followed by a NUL byte."}
    schema["paths"]["/api/predict/{deployment}"] = {
        "post": {
            "operationId": "predict",
            "summary": "Predict (PROTOCOL.md): a JSON object, or any other body as the prompt",
            "tags": ["predict"],
            "parameters": [{"name": "deployment", "in": "path", "required": True, "schema": {"type": "string"}}],
            "requestBody": {
                "required": True,
                "content": {
                    "application/json": {"schema": _component(schema, PredictFields)},
                    "text/plain": {"schema": {"type": "string", "description": "The prompt."}},
                },
            },
            "responses": {
                "200": {
                    "description": "The answer; with `use_stream_chat: true`, a NUL-delimited stream.",
                    "content": {
                        "application/json": {"schema": _component(schema, PredictResponse)},
                        "text/plain": {"schema": stream},
                    },
                },
                **{str(code): {"description": "Error", **error} for code in (400, 401, 403, 404, 413, 429, 500, 503)},
            },
            "security": security,
        }
    }
