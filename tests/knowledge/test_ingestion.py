"""Acceptance 2: an upload answers before its embedding is done, the document reaches `ready` with
its progress complete, the same file twice leaves one set of chunks, a corrupt PDF ends `failed`
with a reason and the knowledge base stays usable; `manage.py ingest` waits for the same (tests/knowledge/test_ingest_command.py)."""

import os
import subprocess
import sys
import uuid

from knowledge.models import Chunk, Document, KnowledgeBase
from tests.conftest import BASE_DIR
from tests.knowledge.conftest import md_file, pdf_file, txt_file, upload, wait_done

LONG_NOTES = md_file(
    "Field notes",
    *[f"Observation {n}: the lighthouse keeper counted {n * 7} gulls on the eastern rocks at dawn. " * 6 for n in range(1, 9)],
)


def test_upload_returns_before_embedding_and_the_document_becomes_ready(stack, token, kb):
    response = upload(stack.url, token, kb.name, "notes.md", LONG_NOTES)
    assert response.status_code == 202, response.text
    queued = response.json()
    assert queued["status"] == "queued" and queued["chunks_done"] == 0 and not queued["duplicate"]
    assert not Chunk.objects.filter(document_id=queued["id"]).exists()

    done = wait_done(stack.url, token, kb.name, queued["id"])
    assert done["status"] == "ready", done
    assert done["error"] == ""
    assert done["chunks_total"] > 1 and done["chunks_done"] == done["chunks_total"]
    chunks = Chunk.objects.filter(document_id=queued["id"])
    assert chunks.count() == done["chunks_total"]
    assert sorted(chunks.values_list("index", flat=True)) == list(range(done["chunks_total"]))
    assert all(c.heading.startswith("Field notes") for c in chunks)


def test_the_same_file_twice_leaves_one_set_of_chunks(stack, token, kb):
    data = txt_file("The lantern of the Brisk lighthouse is green.", "Its keeper is named Odo.")
    first = upload(stack.url, token, kb.name, "brisk.txt", data).json()
    assert wait_done(stack.url, token, kb.name, first["id"])["status"] == "ready"
    chunks = list(Chunk.objects.filter(document_id=first["id"]).values_list("pk", flat=True))

    again = upload(stack.url, token, kb.name, "brisk-copy.txt", data)
    assert again.status_code == 200, again.text
    assert again.json()["id"] == first["id"] and again.json()["duplicate"] is True
    assert Document.objects.filter(knowledge_base=kb).count() == 1
    assert list(Chunk.objects.filter(knowledge_base=kb).values_list("pk", flat=True)) == chunks

    # A task delivered twice (at least once): running ingestion again replaces, never adds.
    from knowledge.services import document_reingest

    document_reingest(document=Document.objects.get(pk=first["id"]))
    assert wait_done(stack.url, token, kb.name, first["id"])["status"] == "ready"
    assert Chunk.objects.filter(knowledge_base=kb).count() == len(chunks)


def test_corrupt_pdf_fails_with_a_reason_and_the_knowledge_base_stays_usable(stack, token, kb):
    corrupt = pdf_file("The pier of Wexmoor is made of oak.")[:200] + b"\x00garbage\xff" * 50
    failed = upload(stack.url, token, kb.name, "broken.pdf", corrupt)
    assert failed.status_code == 202, failed.text
    done = wait_done(stack.url, token, kb.name, failed.json()["id"])
    assert done["status"] == "failed"
    assert "PDF" in done["error"]
    assert not Chunk.objects.filter(document_id=done["id"]).exists()

    good = upload(stack.url, token, kb.name, "wexmoor.txt", txt_file("The pier of Wexmoor is made of oak.")).json()
    assert wait_done(stack.url, token, kb.name, good["id"])["status"] == "ready"
    listed = {d["name"]: d["status"] for d in _list(stack, token, kb)}
    assert listed == {"broken.pdf": "failed", "wexmoor.txt": "ready"}


def test_text_without_words_fails_with_a_reason(stack, token, kb):
    response = upload(stack.url, token, kb.name, "blank.md", b"\n\n   \n")
    assert response.status_code == 202, response.text
    done = wait_done(stack.url, token, kb.name, response.json()["id"])
    assert done["status"] == "failed" and "no text" in done["error"]


def _list(stack, token, kb):
    import requests

    response = requests.get(f"{stack.url}/api/knowledge/{kb.name}/documents", headers={"Authorization": token}, timeout=30)
    assert response.status_code == 200, response.text
    return response.json()["documents"]


def test_ingest_command_creates_the_knowledge_base_and_exits_nonzero_on_failure(stack, user, tmp_path):
    good = tmp_path / "harbour.md"
    good.write_bytes(md_file("Harbour", "The harbour master of Lindql is called Pell."))
    bad = tmp_path / "scan.pdf"
    bad.write_bytes(b"%PDF-1.7 not really a pdf")
    name = f"cli-{uuid.uuid4().hex[:8]}"
    command = [sys.executable, "manage.py", "ingest", name, str(good), str(bad), "--owner", user.username]
    result = subprocess.run(command, cwd=BASE_DIR, env=os.environ.copy(), capture_output=True, text=True, timeout=600)
    assert result.returncode != 0
    assert "scan.pdf" in result.stderr and "failed" in result.stderr
    kb = KnowledgeBase.objects.get(name=name)
    assert kb.owner == user
    statuses = dict(kb.documents.values_list("name", "status"))
    assert statuses == {"harbour.md": "ready", "scan.pdf": "failed"}
    assert Chunk.objects.filter(document__name="harbour.md", knowledge_base=kb).exists()

    again = subprocess.run(command[:5] + ["--owner", user.username], cwd=BASE_DIR, env=os.environ.copy(), capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr
    assert "already ingested" in again.stdout
