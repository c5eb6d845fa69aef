"""Embedding from the web tier: the work runs on a worker (queue EMBEDDING_QUEUE), never here."""

import uuid

from asgiref.sync import sync_to_async
from django.conf import settings

from chat import events
from chat.errors import ServerError

EMBED_TASK = "workers.embed"


def _enqueue(request_id: str, texts: list[str]) -> None:
    from workers.celery import app

    app.send_task(EMBED_TASK, task_id=request_id, queue=settings.EMBEDDING_QUEUE, kwargs={"request_id": request_id, "texts": texts})


async def embed(texts: list[str], *, timeout: float | None = None) -> tuple[list[list[float]], int]:
    """Unit-length vectors of the site's embedding model for `texts`, and the tokens they took."""
    request_id = str(uuid.uuid4())
    subscription = await events.Subscription(request_id).open()
    try:
        await sync_to_async(_enqueue)(request_id, texts)
        async for event in subscription.events(timeout):
            if event["type"] == "final":
                return event["embeddings"], event["usage"]["prompt_tokens"]
            if event["type"] == "error":
                raise ServerError(event["message"])
    except events.StreamTimeout as exc:
        raise ServerError(str(exc)) from None
    finally:
        await subscription.close()
    raise ServerError("The embedding worker sent no vectors.")


def log_embedding(*, token, texts: list[str], model: str, tokens: int | None, error: str) -> None:
    """Store an embeddings call as a request row, like every generation (no deployment: the embedding model)."""
    from django.utils import timezone

    from chat.models import RequestLog
    from chat.services import storable

    RequestLog.objects.create(
        user=token.user,
        token=token,
        protocol="openai",
        prompt=storable("\n".join(texts)),
        params={"endpoint": "embeddings", "model": model, "inputs": len(texts)},
        prompt_tokens=tokens,
        status=RequestLog.Status.ERROR if error else RequestLog.Status.OK,
        error=error,
        started_at=timezone.now(),
        finished_at=timezone.now(),
    )
