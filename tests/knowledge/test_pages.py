"""The knowledge-base pages' rules, through Django's test client (the browser tests in tests/site
cover the page itself): who sees and changes what, and bad input answered with a clear error."""

import uuid

from django.core.files.uploadedfile import SimpleUploadedFile
from django.test import Client

from knowledge import services
from knowledge.models import Document, KnowledgeBase


def client_for(user) -> Client:
    client = Client()
    client.force_login(user)
    return client


def test_shared_users_read_but_only_the_owner_deletes_and_superusers_see_all(db_user_factory):
    owner, shared, admin = db_user_factory(), db_user_factory(), db_user_factory(is_superuser=True)
    kb, _ = services.knowledge_base_get_or_create(name=f"kb-{uuid.uuid4().hex[:10]}", owner=owner)
    kb.shared_with.add(shared)
    document, _ = services.document_create(knowledge_base=kb, name="notes.md", data=b"# Notes\n\nShared notes.")

    for user in (owner, shared, admin):
        client = client_for(user)
        assert kb.name in client.get("/knowledge/").content.decode()
        rows = client.get(f"/knowledge/{kb.name}/documents.json").json()["documents"]
        assert [row["name"] for row in rows] == ["notes.md"]

    shared_client = client_for(shared)
    page = shared_client.get(f"/knowledge/{kb.name}/").content.decode()
    assert 'id="upload"' not in page and "Delete notes.md" not in page  # no controls it may not use
    response = shared_client.post(f"/knowledge/{kb.name}/documents/{document.pk}/delete", follow=True)
    assert "Only the owner" in response.content.decode()
    assert Document.objects.filter(pk=document.pk).exists()
    refused = shared_client.post(
        f"/knowledge/{kb.name}/upload",
        {"file": SimpleUploadedFile("more.md", b"# More")},
        headers={"Accept": "application/json"},
    )
    assert refused.status_code == 403 and "Only the owner" in refused.json()["error"]

    client_for(admin).post(f"/knowledge/{kb.name}/documents/{document.pk}/delete")
    assert not Document.objects.filter(pk=document.pk).exists()


def test_bad_names_and_files_get_an_error_naming_the_problem(db_user_factory):
    user = db_user_factory()
    client = client_for(user)
    response = client.post("/knowledge/", {"name": "no spaces allowed"})
    assert response.status_code == 200 and "name: Letters, digits" in response.content.decode()
    name = f"kb-{uuid.uuid4().hex[:10]}"
    assert client.post("/knowledge/", {"name": name}).status_code == 302
    taken = client_for(db_user_factory()).post("/knowledge/", {"name": name})
    assert "already exists" in taken.content.decode()
    assert KnowledgeBase.objects.get(name=name).owner == user

    json = {"Accept": "application/json"}
    bad = client.post(f"/knowledge/{name}/upload", {"file": SimpleUploadedFile("tool.exe", b"MZ")}, headers=json)
    assert bad.status_code == 400 and "Unsupported file type '.exe'" in bad.json()["error"]
    empty = client.post(f"/knowledge/{name}/upload", {}, headers=json)
    assert empty.status_code == 400 and "Choose a file" in empty.json()["error"]
    assert client.get(f"/knowledge/{name}/documents.json").json() == {"documents": []}
