"""`manage.py ingest <kb> <file>...` queues each file on a worker (as an upload does) and follows
its progress to `ready`; `--in-process` ingests here with no worker; with no worker, or none left,
or the time up, it says so and exits non-zero."""

import os
import subprocess
import sys
import time
import uuid

from knowledge.models import Chunk, Document, KnowledgeBase
from llmsite import workers_alive
from tests.conftest import BASE_DIR
from tests.knowledge.conftest import md_file

# Enough text for several batches of embedded chunks (32 chunks a batch, 800 characters a chunk).
LEDGER = md_file(
    "Tide ledger",
    *[f"Entry {n}: the tide gauge at Quorrin pier read {n * 3} centimetres above the mark at noon. " * 9 for n in range(1, 41)],
)


def ingest(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    command = [sys.executable, "manage.py", "ingest", *args]
    return subprocess.run(command, cwd=BASE_DIR, env={**os.environ, **(env or {})}, capture_output=True, text=True, timeout=600)


def queue_without_worker() -> str:
    return f"nobody-{uuid.uuid4().hex[:8]}"


def test_ingest_command_queues_the_file_on_the_worker_and_follows_its_progress_to_ready(stack, user, tmp_path):
    path = tmp_path / "ledger.md"
    path.write_bytes(LEDGER)
    name = f"cli-{uuid.uuid4().hex[:8]}"

    result = ingest(name, str(path), "--owner", user.username)

    assert result.returncode == 0, result.stderr
    document = Document.objects.get(knowledge_base__name=name, name="ledger.md")
    assert document.status == Document.Status.READY
    total = document.chunks_total
    assert total > 32 and document.chunks_done == total
    assert Chunk.objects.filter(document=document).count() == total
    assert f"Knowledge base '{name}' (created, owner {user.username})" in result.stdout
    assert f"{total}/{total}" in result.stdout  # the bar, complete
    assert f"ledger.md: ready, document {document.pk}, {total} chunks" in result.stdout
    # The worker did the work: it logged this document's ingestion.
    assert f"ingestion of document {document.pk} started" in stack.worker.log_path.read_text(errors="replace")


def test_ingest_command_in_process_ingests_here_with_no_worker(stack, user, tmp_path):
    path = tmp_path / "ledger.md"
    path.write_bytes(LEDGER)
    name = f"cli-{uuid.uuid4().hex[:8]}"
    # No worker consumes this queue: a file queued there would never become ready.
    result = ingest(name, str(path), "--owner", user.username, "--in-process", env={"EMBEDDING_QUEUE": queue_without_worker()})

    assert result.returncode == 0, result.stderr
    document = Document.objects.get(knowledge_base__name=name, name="ledger.md")
    assert document.status == Document.Status.READY
    total = document.chunks_total
    assert total > 32 and Chunk.objects.filter(document=document).count() == total
    assert f"{total}/{total}" in result.stdout
    assert f"ledger.md: ready, document {document.pk}, {total} chunks" in result.stdout
    assert f"ingestion of document {document.pk} started" not in stack.worker.log_path.read_text(errors="replace")

    again = ingest(name, str(path), "--in-process", "--owner", user.username)
    assert again.returncode == 0, again.stderr
    assert f"ledger.md: already ingested as document {document.pk} ({total} chunks)" in again.stdout


def test_ingest_command_with_no_worker_says_so_and_stores_nothing(stack, user, tmp_path):
    path = tmp_path / "a.txt"
    path.write_text("The ferry to Quorrin leaves at nine.")
    name = f"cli-{uuid.uuid4().hex[:8]}"
    queue = queue_without_worker()

    result = ingest(name, str(path), "--owner", user.username, env={"EMBEDDING_QUEUE": queue})

    assert result.returncode != 0
    assert f"No worker consumes the queue '{queue}'" in result.stderr and "--in-process" in result.stderr
    assert not KnowledgeBase.objects.filter(name=name).exists()


def test_ingest_command_stops_waiting_when_the_time_is_up(stack, user, tmp_path):
    path = tmp_path / "b.txt"
    path.write_text("The Quorrin lamp is lit at dusk.")
    name = f"cli-{uuid.uuid4().hex[:8]}"
    queue = queue_without_worker()
    # A worker that beats for this queue but never takes anything from it.
    workers_alive.sync_client().set(workers_alive.queue_alive_key(queue), "hung@nowhere", ex=120)

    result = ingest(name, str(path), "--owner", user.username, "--timeout", "1", env={"EMBEDDING_QUEUE": queue})

    assert result.returncode != 0
    assert "b.txt: not ready after 1 s (queued, 0 of ? chunks)" in result.stderr
    assert "1 of 1 file(s) failed" in result.stderr
    assert Document.objects.get(knowledge_base__name=name, name="b.txt").status == Document.Status.QUEUED


def test_ingest_command_stops_waiting_when_no_worker_is_left(stack, user, tmp_path):
    path = tmp_path / "c.txt"
    path.write_text("The Quorrin pier is closed on Sundays.")
    name = f"cli-{uuid.uuid4().hex[:8]}"
    queue = queue_without_worker()
    alive = workers_alive.queue_alive_key(queue)
    workers_alive.sync_client().set(alive, "leaving@nowhere", ex=120)  # a worker that takes nothing...
    command = [sys.executable, "manage.py", "ingest", name, str(path), "--owner", user.username]
    env = {**os.environ, "EMBEDDING_QUEUE": queue}
    with subprocess.Popen(command, cwd=BASE_DIR, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) as process:
        deadline = time.monotonic() + 120
        while not Document.objects.filter(knowledge_base__name=name).exists():
            assert process.poll() is None and time.monotonic() < deadline, process.communicate()
            time.sleep(0.1)
        workers_alive.sync_client().delete(alive)  # ...and then is gone
        stdout, stderr = process.communicate(timeout=120)

    assert process.returncode != 0
    assert f"c.txt: no worker consumes the queue '{queue}' any more (queued, 0 of ? chunks)" in stderr
    assert "--in-process" in stderr
    assert Document.objects.get(knowledge_base__name=name, name="c.txt").status == Document.Status.QUEUED
