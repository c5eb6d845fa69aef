"""A worker killed during ingestion: the document is ingested again by a live worker (never left
"embedding") and ends with one set of chunks; one whose workers keep dying is marked failed."""

import os
import signal
import time
import uuid

from django.conf import settings as django_settings

from knowledge import services
from knowledge.models import Chunk, Document, KnowledgeBase
from llmsite.launcher import worker_command
from tests.conftest import Process, wait_for_log
from workers import ingestion

TIMEOUT = 300  # a deadline for polling, not a speed check


def facts(count: int) -> bytes:
    """Short paragraphs, each a chunk of its own at chunk_size 100."""
    return "\n\n".join(f"Fact {i}: the code of item {i} is {uuid.uuid4().hex[:12]}." for i in range(count)).encode()


def ingestion_worker(queue: str) -> Process:
    name = f"{queue}-{uuid.uuid4().hex[:4]}"
    env = {"EMBEDDING_QUEUE": queue, "INGEST_SWEEP_SECONDS": "1"}
    worker = Process(f"worker-{name}", worker_command([queue], hostname=f"{name}@%h"), env).start()
    wait_for_log(worker, " ready.")
    return worker


def wait_for(predicate, what: str):
    deadline = time.monotonic() + TIMEOUT
    while not (value := predicate()):
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)
    return value


def test_a_worker_killed_mid_ingestion_leaves_the_document_to_another_run_without_duplicate_chunks(stack, user, settings):
    queue = f"ingest-{uuid.uuid4().hex[:6]}"
    settings.EMBEDDING_QUEUE = queue  # this test's uploads go to this test's worker
    kb = KnowledgeBase.objects.create(name=f"faults-{uuid.uuid4().hex[:8]}", owner=user, chunk_size=100, chunk_overlap=10)
    worker = ingestion_worker(queue)
    restarted = None
    try:
        document, _ = services.document_upload(knowledge_base=kb, name="facts.txt", data=facts(1200))
        embedding = wait_for(
            lambda: Document.objects.filter(pk=document.pk, status=Document.Status.EMBEDDING, chunks_done__gt=0).first(),
            "embedding under way",
        )
        os.kill(worker.popen.pid, signal.SIGKILL)
        worker.popen.wait()
        stuck = Document.objects.get(pk=document.pk)
        print(f"\nkilled during ingestion at {stuck.chunks_done}/{stuck.chunks_total} chunks embedded")
        assert stuck.status == Document.Status.EMBEDDING and stuck.chunks_done < stuck.chunks_total

        restarted = ingestion_worker(queue)
        done = wait_for(
            lambda: Document.objects.filter(pk=document.pk, status__in=[Document.Status.READY, Document.Status.FAILED]).first(),
            "the document to be ingested again",
        )
        assert done.status == Document.Status.READY, done.error
        # Whichever live worker's sweep saw it first ran it again (the suite's worker sweeps too).
        retried = f"ingestion of document {document.pk} started (attempt 2)"
        assert any(retried in w.log_path.read_text(errors="replace") for w in (restarted, stack.worker))
        chunks = Chunk.objects.filter(document=document)
        indexes = list(chunks.values_list("index", flat=True))
        assert sorted(indexes) == list(range(embedding.chunks_total)) == list(range(done.chunks_total))
        assert chunks.values("text").distinct().count() == len(indexes)
        assert "Fact 1199:" in chunks.order_by("-index").first().text
    finally:
        worker.stop()
        if restarted is not None:
            restarted.stop()


def test_a_document_whose_worker_died_too_often_is_marked_failed_not_left_embedding(stack, user):
    kb = KnowledgeBase.objects.create(name=f"faults-{uuid.uuid4().hex[:8]}", owner=user)
    document, _ = services.document_create(knowledge_base=kb, name="cursed.txt", data=facts(3))
    Document.objects.filter(pk=document.pk).update(status=Document.Status.EMBEDDING, chunks_total=3, chunks_done=1)
    # As a worker leaves it: held by a worker that no longer beats, after its last allowed attempt.
    client = ingestion.events.sync_client()
    client.set(ingestion.holder_key(document.pk), "gone@nowhere 1", ex=600)
    client.set(ingestion.attempts_key(document.pk), django_settings.INGEST_MAX_ATTEMPTS, ex=600)

    failed = wait_for(lambda: Document.objects.filter(pk=document.pk, status=Document.Status.FAILED).first(), "the sweep")
    assert f"stopped {django_settings.INGEST_MAX_ATTEMPTS} times" in failed.error
    assert not Chunk.objects.filter(document=document).exists()
