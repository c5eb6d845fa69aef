"""Domain errors of the API edge: one class per kind, one JSON shape (PROTOCOL.md).

Each kind has a `reason`, the label a refused request is counted under in /metrics
(`llmsite:requests_total{outcome="rejected"}`); server errors have none (outcome "error").
"""

import contextlib
import logging

log = logging.getLogger(__name__)


class ApiError(Exception):
    status = 400
    type = "invalid_request_error"
    reason: str | None = "invalid_request"
    ws_close_code = None  # errors that end a WebSocket connection rather than one request
    deployment = ""  # the deployment the refused request was for, once known (`concerning`)
    counted = False  # counted in /metrics already (by an edge, or by the worker that sent it)
    request_id = None  # the stored request's, where it failed after being stored (sent as X-Request-Id)

    def __init__(self, message: str, *, param: str | None = None):
        super().__init__(message)
        self.message = message
        self.param = param

    def body(self) -> dict:
        error = {"message": self.message, "type": self.type}
        if self.param is not None:
            error["param"] = self.param
        return {"error": error}


class InvalidRequest(ApiError):
    pass


class ContextTooLong(InvalidRequest):
    def __init__(self, *, prompt_tokens: int, context_length: int):
        super().__init__(
            f"The prompt and history are {prompt_tokens} tokens, but the model's context is "
            f"{context_length} tokens: shorten the prompt or the history.",
            param="prompt",
        )


class BodyTooLarge(ApiError):
    status = 413
    reason = "too_large"

    def __init__(self, limit: int):
        super().__init__(f"The request body is larger than the limit of {limit} bytes.")


class Unauthorized(ApiError):
    status = 401
    type = "authentication_error"
    reason = "authentication"
    ws_close_code = 4401


class Forbidden(ApiError):
    status = 403
    type = "permission_error"
    reason = "permission"
    ws_close_code = 4403


class UnknownDeployment(ApiError):
    status = 404
    type = "not_found_error"
    ws_close_code = 4404

    def __init__(self, name: str):
        super().__init__(f"There is no deployment named '{name}'.", param="deployment")


class RateLimited(ApiError):
    """Over a token's requests or tokens per minute, or a deployment's generations in flight;
    `retry_after` seconds until it frees up. `reason`: "rate_limited" (requests per minute),
    "quota" (tokens per minute) or "overloaded" (the deployment's limit)."""

    status = 429
    type = "rate_limit_error"

    def __init__(self, message: str, *, retry_after: int, reason: str = "rate_limited"):
        super().__init__(message)
        self.retry_after = retry_after
        self.reason = reason


class QuotaExceeded(RateLimited):
    """Over the user's token budget for the UTC day or month (chat/quotas.py): 429 with
    `insufficient_quota` (OpenAI's type and code), and close code 4429 on the predict WebSocket."""

    type = "insufficient_quota"
    code = "insufficient_quota"
    ws_close_code = 4429

    def __init__(self, message: str, *, retry_after: int):
        super().__init__(message, retry_after=retry_after, reason="quota")


class MethodNotAllowed(ApiError):
    status = 405

    def __init__(self, method: str):
        super().__init__(f"{method} is not supported here: send a POST request.")


class ServerError(ApiError):
    status = 500
    type = "server_error"
    reason = None


class Unavailable(ServerError):
    """503: no live worker, or the database or Redis away: the site cannot take the request now."""

    status = 503
    reason = "overloaded"


def outage(what: str, exc: Exception, *, trace: bool = False) -> str:
    """A client's message for a failure of the site's own services: `what` and the error's kind,
    not its text (a database's or Redis's text can name hosts, ports, tables and the values a
    statement held); the whole text goes to the log (a line, as an outage fails every request;
    with its traceback where `trace`: a failure of any kind)."""
    log.warning("%s: %s: %s", what, type(exc).__name__, exc, exc_info=exc if trace else None)
    return f"{what} ({type(exc).__name__}); try again shortly."


# The reason of an error known only by its HTTP status (django-ninja's own errors).
REASON_BY_STATUS = {401: "authentication", 403: "permission", 413: "too_large", 429: "rate_limited"}


def reason_for_status(status: int) -> str | None:
    return None if status >= 500 else REASON_BY_STATUS.get(status, "invalid_request")


@contextlib.contextmanager
def concerning(deployment: str):
    """An ApiError raised inside names `deployment` (a deployment that exists), for /metrics."""
    try:
        yield
    except ApiError as exc:
        exc.deployment = exc.deployment or deployment
        raise
