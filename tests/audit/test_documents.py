"""Document uploads and deletions are recorded where they come in: the knowledge API (token),
the knowledge pages and the admin (session), and `manage.py ingest` (no request: the knowledge
base's owner, no address)."""

import os
import subprocess
import sys
import uuid

from django.core.files.uploadedfile import SimpleUploadedFile

from audit.models import AuditEntry
from chat.tokens import token_create
from knowledge.models import Document, KnowledgeBase
from tests.audit.conftest import address, client_from, only_entry, person
from tests.conftest import BASE_DIR
from tests.knowledge.conftest import upload

Action = AuditEntry.Action


def _kb(owner) -> KnowledgeBase:
    return KnowledgeBase.objects.create(name=f"kb-{uuid.uuid4().hex[:10]}", owner=owner)


def _text(tag: str) -> bytes:
    return f"The {tag} ferry leaves at noon ({uuid.uuid4().hex}).".encode()


def test_an_upload_through_the_api_is_recorded_with_the_token_user_and_address(stack):
    owner = person()
    kb = _kb(owner)
    token, raw = token_create(user=owner)
    response = upload(stack.url, raw, kb.name, "api.txt", _text("api"))
    assert response.status_code == 202, response.text
    document_id = response.json()["id"]
    entry = only_entry(action=Action.DOCUMENT_UPLOADED, object_type="knowledge.document", object_id=str(document_id))
    assert (entry.user, entry.username, entry.address, entry.object_text) == (owner, owner.username, "127.0.0.1", "api.txt")
    assert token.prefix in entry.note and kb.name in entry.note and raw not in entry.note


def test_uploads_and_deletions_on_the_knowledge_pages_are_recorded():
    owner, ip = person(), address()
    kb = _kb(owner)
    client = client_from(ip, owner)
    response = client.post(
        f"/knowledge/{kb.name}/upload", {"file": SimpleUploadedFile("page.txt", _text("page"))}, headers={"Accept": "application/json"}
    )
    assert response.status_code == 200, response.content
    document_id = response.json()["documents"][0]["id"]
    uploaded = only_entry(action=Action.DOCUMENT_UPLOADED, object_type="knowledge.document", object_id=str(document_id))
    assert (uploaded.user, uploaded.address, uploaded.object_text) == (owner, ip, "page.txt")

    assert client.post(f"/knowledge/{kb.name}/documents/{document_id}/delete").status_code == 302
    assert not Document.objects.filter(pk=document_id).exists()
    deleted = only_entry(action=Action.DOCUMENT_DELETED, object_type="knowledge.document", object_id=str(document_id))
    assert (deleted.user, deleted.address, deleted.object_text) == (owner, ip, "page.txt")
    assert kb.name in deleted.note


def test_a_refused_deletion_records_nothing():
    owner, stranger_reader = person(), person()
    kb = _kb(owner)
    kb.shared_with.add(stranger_reader)
    document = Document.objects.create(knowledge_base=kb, name="kept.txt", file_type="txt", size=3, sha256=uuid.uuid4().hex, content=b"abc")
    client_from(address(), stranger_reader).post(f"/knowledge/{kb.name}/documents/{document.pk}/delete")
    assert Document.objects.filter(pk=document.pk).exists()
    assert not AuditEntry.objects.filter(object_type="knowledge.document", object_id=str(document.pk)).exists()


def test_uploads_and_deletions_in_the_admin_are_recorded(admin_user):
    ip, owner = address(), person()
    kb = _kb(owner)
    client = client_from(ip, admin_user)
    file = SimpleUploadedFile("admin.txt", _text("admin"), content_type="text/plain")
    assert client.post("/admin/knowledge/document/add/", {"knowledge_base": kb.pk, "upload": file}).status_code == 302
    document = Document.objects.get(knowledge_base=kb, name="admin.txt")
    uploaded = only_entry(action=Action.DOCUMENT_UPLOADED, object_type="knowledge.document", object_id=str(document.pk))
    assert (uploaded.user, uploaded.address, uploaded.object_text) == (admin_user, ip, "admin.txt")

    response = client.post("/admin/knowledge/document/", {"action": "delete_selected", "_selected_action": [document.pk], "post": "yes"})
    assert response.status_code == 302 and not Document.objects.filter(pk=document.pk).exists()
    deleted = only_entry(action=Action.DOCUMENT_DELETED, object_type="knowledge.document", object_id=str(document.pk))
    assert (deleted.user, deleted.address, deleted.object_text) == (admin_user, ip, "admin.txt")
    assert deleted.changes["knowledge_base"] == [kb.name, None]


def test_an_upload_by_the_ingest_command_names_the_owner_and_no_address(stack, tmp_path):
    owner = person()
    kb = _kb(owner)
    path = tmp_path / "cli.txt"
    path.write_bytes(_text("cli"))
    command = [sys.executable, "manage.py", "ingest", kb.name, str(path), "--owner", owner.username]
    result = subprocess.run(command, cwd=BASE_DIR, env=os.environ.copy(), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    document = Document.objects.get(knowledge_base=kb, name="cli.txt")
    entry = only_entry(action=Action.DOCUMENT_UPLOADED, object_type="knowledge.document", object_id=str(document.pk))
    assert (entry.user, entry.address) == (owner, None) and entry.note.startswith("command")
