import logging

from celery import shared_task

from workers import loader  # noqa: F401  (connects the model-loading signal)
from workers import services

log = logging.getLogger(__name__)


@shared_task(name="workers.generate", ignore_result=True)
def generate(**request) -> None:
    """Generate one answer for a GenerationRequest (llmsite.contract, sent as the task's kwargs);
    at most once (acknowledged on start, never retried)."""
    services.generate(request)


@shared_task(name="workers.embed", ignore_result=True)
def embed(*, request_id: str, texts: list) -> None:
    """Embed texts for a waiting web request; the vectors go back on the request's stream."""
    services.run_embedding(request_id=request_id, texts=texts)


# Ingestion is at least once (DESIGN.md): acknowledged only when it ends, and put back on the queue
# if the worker dies mid-way (or queued again by another worker's sweep, workers/ingestion.py);
# document_ingest is idempotent, so a second run stores no duplicates.
@shared_task(name="workers.ingest_document", ignore_result=True, acks_late=True, reject_on_worker_lost=True)
def ingest_document(*, document_id: int) -> None:
    """Parse, split, embed and store one uploaded document (queue EMBEDDING_QUEUE)."""
    from django.db import close_old_connections

    from workers import ingestion

    close_old_connections()
    ingestion.ingest(document_id=document_id, hostname=loader.HOSTNAME)
