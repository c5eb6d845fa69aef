"""Reads for the APIs: which models a token may use."""

from django.conf import settings

from llmsite.errors import ApiError
from chat.models import ApiToken, Deployment

EMBEDDING_ALIAS = "default"  # /v1/embeddings: the site's default embedding model, the one knowledge bases use


class UnknownModel(ApiError):
    status = 404
    type = "not_found_error"

    def __init__(self, name: str, what: str = "model"):
        super().__init__(f"The {what} '{name}' does not exist or this token may not use it.", param="model")


def deployments_for(*, token: ApiToken):
    """The enabled deployments this token may use (no listed deployments: all of them)."""
    deployments = Deployment.objects.filter(enabled=True)
    if token.deployments.exists():
        deployments = deployments.filter(pk__in=token.deployments.values("pk"))
    return deployments


def model_cards(*, token: ApiToken) -> list[dict]:
    """Chat deployments by name, then the embedding model under its own name (never 'default')."""
    cards = [{"id": d.name, "created": int(d.created_at.timestamp()), "owned_by": "llmsite"} for d in deployments_for(token=token)]
    cards.append({"id": settings.EMBEDDING_MODEL_NAME, "created": 0, "owned_by": "llmsite-embeddings"})
    return cards


def model_card(*, token: ApiToken, name: str) -> dict:
    for card in model_cards(token=token):
        if card["id"] == name:
            return card
    raise UnknownModel(name)


def embedding_model_name(name: str) -> str:
    """The embedding model a request names: its own name, or 'default'."""
    if name in (EMBEDDING_ALIAS, settings.EMBEDDING_MODEL_NAME):
        return settings.EMBEDDING_MODEL_NAME
    raise UnknownModel(name, "embedding model")


def default_engine(source: str) -> str:
    """The engine a new deployment of `source` gets: llama.cpp for a GGUF file where
    llama-cpp-python is installed (the fastest CPU path, see the README's engine table),
    transformers otherwise. Looked up without importing anything heavy."""
    import importlib.util

    if source.strip().endswith(".gguf") and importlib.util.find_spec("llama_cpp") is not None:
        return Deployment.Engine.LLAMACPP
    return Deployment.Engine.TRANSFORMERS
