"""The admin way in: upload a file on the document form, see its status, re-ingest it."""

import time

from django.core.files.uploadedfile import SimpleUploadedFile
from django.test import Client

from knowledge.models import Chunk, Document
from tests.knowledge.conftest import INGEST_TIMEOUT, txt_file


def wait_for(document_id: int) -> Document:
    deadline = time.monotonic() + INGEST_TIMEOUT
    while True:
        document = Document.objects.defer("content").get(pk=document_id)
        if document.status in (Document.Status.READY, Document.Status.FAILED):
            return document
        assert time.monotonic() < deadline, document.status
        time.sleep(0.3)


def test_admin_uploads_shows_status_and_reingests(stack, kb, db_user_factory):
    admin = db_user_factory(is_superuser=True, is_staff=True)
    client = Client()
    client.force_login(admin)
    upload = SimpleUploadedFile("ferry.txt", txt_file("The ferry to Osk leaves at noon."), content_type="text/plain")
    response = client.post("/admin/knowledge/document/add/", {"knowledge_base": kb.pk, "upload": upload})
    assert response.status_code == 302, response.content.decode()[:2000]
    document = Document.objects.get(knowledge_base=kb, name="ferry.txt")
    assert wait_for(document.pk).status == Document.Status.READY

    listing = client.get("/admin/knowledge/document/", {"knowledge_base__id__exact": kb.pk}).content.decode()
    assert "ferry.txt" in listing and "ready" in listing

    bad = SimpleUploadedFile("ferry.exe", b"MZ", content_type="application/octet-stream")
    refused = client.post("/admin/knowledge/document/add/", {"knowledge_base": kb.pk, "upload": bad})
    assert refused.status_code == 200 and "Unsupported file type" in refused.content.decode()

    chunks = Chunk.objects.filter(document=document).count()
    client.post("/admin/knowledge/document/", {"action": "reingest", "_selected_action": [document.pk]})
    assert wait_for(document.pk).status == Document.Status.READY
    assert Chunk.objects.filter(document=document).count() == chunks
    assert Document.objects.filter(knowledge_base=kb).count() == 1
