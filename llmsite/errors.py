"""Domain errors of the API edge: one class per kind, one JSON shape (PROTOCOL.md)."""


class ApiError(Exception):
    status = 400
    type = "invalid_request_error"
    ws_close_code = None  # errors that end a WebSocket connection rather than one request

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

    def __init__(self, limit: int):
        super().__init__(f"The request body is larger than the limit of {limit} bytes.")


class Unauthorized(ApiError):
    status = 401
    type = "authentication_error"
    ws_close_code = 4401


class Forbidden(ApiError):
    status = 403
    type = "permission_error"
    ws_close_code = 4403


class UnknownDeployment(ApiError):
    status = 404
    type = "not_found_error"
    ws_close_code = 4404

    def __init__(self, name: str):
        super().__init__(f"There is no deployment named '{name}'.", param="deployment")


class RateLimited(ApiError):
    """Over a token's requests or tokens per minute; `retry_after` seconds until it frees up."""

    status = 429
    type = "rate_limit_error"

    def __init__(self, message: str, *, retry_after: int):
        super().__init__(message)
        self.retry_after = retry_after


class MethodNotAllowed(ApiError):
    status = 405

    def __init__(self, method: str):
        super().__init__(f"{method} is not supported here: send a POST request.")


class ServerError(ApiError):
    status = 500
    type = "server_error"


class Unavailable(ServerError):
    status = 503
