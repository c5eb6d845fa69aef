"""Ingestion that outlives a worker dying mid-way (DESIGN.md: at least once, idempotent).

Each run holds its document in Redis under its worker's name. Workers of the ingestion queue
look every INGEST_SWEEP_SECONDS for documents held by a worker whose heartbeat stopped and queue
them again, so a document never stays "parsing" or "embedding" behind a dead worker (the broker
would only hand the task out again after its visibility timeout, an hour by default). A document
whose worker died INGEST_MAX_ATTEMPTS times is marked failed instead of being tried forever.
"""

import json
import logging
import os
import threading

from django.conf import settings

from chat import events
from knowledge import services
from knowledge.models import Document
from workers import embeddings
from workers.periodic import every

log = logging.getLogger(__name__)

HOLD_SECONDS = 24 * 3600
IN_PROGRESS = (Document.Status.PARSING, Document.Status.EMBEDDING)


def holder_key(document_id: int) -> str:
    return f"llmsite:ingest:{document_id}"


def attempts_key(document_id: int) -> str:
    return f"llmsite:ingest-attempts:{document_id}"


def _me(hostname: str) -> str:
    # The process id too: a worker restarted under the same name is not the one that died.
    return f"{hostname} {os.getpid()}"


def _holder(client, document_id: int) -> str | None:
    value = client.get(holder_key(document_id))
    return value.decode() if value else None


def _alive(client, holder: str) -> bool:
    """Whether the worker process that holds a document still beats (its heartbeat names its pid)."""
    hostname, _, pid = holder.rpartition(" ")
    beat = client.get(events.worker_host_key(hostname))
    return beat is not None and str(json.loads(beat).get("pid")) == pid


def ingest(*, document_id: int, hostname: str) -> None:
    """One delivery of a document's ingestion task: run it unless it is done or a live worker has it."""
    client = events.sync_client()
    status = Document.objects.filter(pk=document_id).values_list("status", flat=True).first()
    if status is None or status in (Document.Status.READY, Document.Status.FAILED):
        log.info("document %s is %s; this delivery of its ingestion does nothing", document_id, status or "gone")
        return
    holder = _holder(client, document_id)
    if holder and holder != _me(hostname) and _alive(client, holder):
        log.info("document %s is being ingested by %s; this delivery does nothing", document_id, holder)
        return
    if status == Document.Status.QUEUED:  # a fresh upload or an asked-for re-ingestion
        client.set(attempts_key(document_id), 1, ex=HOLD_SECONDS)
        attempt = 1
    else:  # the run before this one stopped with its worker
        attempt = client.incr(attempts_key(document_id))
    if attempt > settings.INGEST_MAX_ATTEMPTS:
        services.document_fail(
            document_id=document_id,
            reason=f"Ingestion failed: a worker stopped {settings.INGEST_MAX_ATTEMPTS} times while ingesting this document.",
        )
        client.delete(attempts_key(document_id))
        return
    client.set(holder_key(document_id), _me(hostname), ex=HOLD_SECONDS)
    log.info("ingestion of document %s started (attempt %d)", document_id, attempt)
    try:
        services.document_ingest(document_id=document_id, embed=embeddings.embed_vectors)
    finally:
        client.delete(holder_key(document_id), attempts_key(document_id))


def recover_stalled() -> list[int]:
    """Queue again every document whose ingesting worker stopped beating; returns their ids."""
    client = events.sync_client()
    requeued = []
    for document_id in Document.objects.filter(status__in=IN_PROGRESS).values_list("pk", flat=True):
        holder = _holder(client, document_id)
        if holder is None or _alive(client, holder):
            continue  # ingested in-process (manage.py ingest --in-process), or still under way
        if client.getdel(holder_key(document_id)) is None:
            continue  # another worker's sweep took it first
        log.warning("the worker %s stopped while ingesting document %s: queued again", holder, document_id)
        services.enqueue_ingestion(document_id)
        requeued.append(document_id)
    return requeued


def start_sweeper() -> threading.Thread:
    return every(settings.INGEST_SWEEP_SECONDS, recover_stalled, name="ingestion-sweep", failure="the stalled-ingestion sweep failed")
