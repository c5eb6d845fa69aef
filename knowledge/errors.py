"""Domain errors of knowledge bases, in the API's one error shape (llmsite.errors)."""

from llmsite.errors import ApiError, InvalidRequest


class UnknownKnowledgeBase(ApiError):
    status = 404
    type = "not_found_error"

    def __init__(self, name: str):
        super().__init__(f"There is no knowledge base named '{name}'.", param="knowledge_base")


class UnknownDocument(ApiError):
    status = 404
    type = "not_found_error"

    def __init__(self, document_id, knowledge_base: str):
        super().__init__(f"There is no document {document_id} in the knowledge base '{knowledge_base}'.", param="document")


class BadUpload(InvalidRequest):
    def __init__(self, message: str):
        super().__init__(message, param="file")


class FileTooLarge(ApiError):
    status = 413

    def __init__(self, size: int | None, limit: int):
        what = f"The file is {size} bytes" if size is not None else "The upload is too large"
        super().__init__(f"{what}, over the limit of {limit} bytes.", param="file")


class ReadOnly(ApiError):
    status = 405

    def __init__(self, method: str):
        super().__init__(f"{method} is not supported here: send a GET request.")
