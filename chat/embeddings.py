"""Embedding from the web tier: the work runs on a worker (queue EMBEDDING_QUEUE), never here."""

import uuid

from asgiref.sync import sync_to_async
from django.conf import settings

from chat import events, lifecycle
from chat.relay import Formatter, api_error, first
from llmsite import contract, producer
from llmsite.errors import ServerError


class _Vectors(Formatter):
    def on_embeddings(self, event: contract.Embeddings) -> list:
        return [(event.vectors, event.tokens)]

    def on_error(self, event: contract.Error) -> list:
        raise api_error(event)


class _Wait:
    """A subscription to an embedding request, with its own silence limit, as a generation."""

    def __init__(self, subscription: events.Subscription, timeout: float | None):
        self.subscription, self.timeout = subscription, timeout

    def events(self):
        return self.subscription.events(self.timeout)

    async def close(self) -> None:
        await self.subscription.close()


def new_id() -> str:
    """An embeddings call's id: its request row, its worker task and its event stream all carry it."""
    return str(uuid.uuid4())


async def embed(texts: list[str], *, request_id: str | None = None, timeout: float | None = None) -> tuple[list[list[float]], int]:
    """Unit-length vectors of the site's embedding model for `texts`, and the tokens they took."""
    request_id = request_id or new_id()
    subscription = await events.Subscription(request_id).open()
    try:
        await sync_to_async(producer.send)(
            producer.EMBED_TASK, task_id=request_id, queue=settings.EMBEDDING_QUEUE, kwargs={"request_id": request_id, "texts": texts}
        )
        answer = await first(_Wait(subscription, timeout), _Vectors())
    except events.StreamTimeout as exc:
        raise ServerError(str(exc)) from None
    finally:
        await subscription.close()
    if answer is None:
        raise ServerError("The embedding worker sent no vectors.")
    return answer


def log_embedding(*, request_id: str, token, texts: list[str], model: str, tokens: int | None, error: str) -> None:
    """Store an embeddings call as a request row, like every generation (no deployment: the embedding model)."""
    lifecycle.record_done(
        request_id=request_id,
        user=token.user,
        token=token,
        protocol="openai",
        prompt="\n".join(texts),
        params={"endpoint": "embeddings", "model": model, "inputs": len(texts)},
        prompt_tokens=tokens,
        error=error,
    )
