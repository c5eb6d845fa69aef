"""Acceptance 4: each bad input gets its status and error shape, and nothing is half-stored."""

import pytest
import requests

from chat.models import RequestLog
from chat.tokens import token_create
from knowledge.models import Chunk, Document, KnowledgeBase
from tests.chat.test_predict_errors import assert_error
from tests.conftest import start_web
from tests.knowledge.conftest import documents_url, txt_file, upload


@pytest.fixture
def nothing_stored():
    """Asserts that the test stored no document, chunk or generation request."""
    before = (Document.objects.count(), Chunk.objects.count(), RequestLog.objects.count())
    yield
    assert (Document.objects.count(), Chunk.objects.count(), RequestLog.objects.count()) == before


@pytest.mark.parametrize("name", ["tool.exe", "picture.png", "README"])
def test_unsupported_file_type_is_400_naming_the_file(stack, token, kb, nothing_stored, name):
    error = assert_error(upload(stack.url, token, kb.name, name, b"MZ\x90\x00 binary"), 400, "invalid_request_error", "file")
    assert ".txt" in error["message"] and ".pdf" in error["message"]


def test_empty_file_is_400(stack, token, kb, nothing_stored):
    error = assert_error(upload(stack.url, token, kb.name, "empty.txt", b""), 400, "invalid_request_error", "file")
    assert "empty" in error["message"]


def test_no_file_is_400(stack, token, kb, nothing_stored):
    response = requests.post(documents_url(stack.url, kb.name), headers={"Authorization": token}, data={"x": "1"}, timeout=30)
    assert_error(response, 400, "invalid_request_error", "file")


def test_file_over_the_size_limit_is_413(stack, token, kb, nothing_stored):
    web, url = start_web(env={"KNOWLEDGE_MAX_UPLOAD_BYTES": "1000"})
    try:
        error = assert_error(upload(url, token, kb.name, "big.txt", b"word " * 400), 413, "invalid_request_error", "file")
        assert "1000" in error["message"] and "2000" in error["message"]
    finally:
        web.stop()


def test_unknown_knowledge_base_is_404_on_its_endpoint(stack, token, nothing_stored):
    error = assert_error(upload(stack.url, token, "no-such-kb", "a.txt", b"text"), 404, "not_found_error", "knowledge_base")
    assert "no-such-kb" in error["message"]
    response = requests.get(f"{documents_url(stack.url, 'no-such-kb')}/1", headers={"Authorization": token}, timeout=30)
    assert_error(response, 404, "not_found_error", "knowledge_base")


def test_unknown_document_is_404(stack, token, kb, nothing_stored):
    response = requests.get(f"{documents_url(stack.url, kb.name)}/999999999", headers={"Authorization": token}, timeout=30)
    assert_error(response, 404, "not_found_error", "document")


def test_missing_token_is_401(stack, kb, nothing_stored):
    response = requests.post(documents_url(stack.url, kb.name), files={"file": ("a.txt", b"text")}, timeout=30)
    assert_error(response, 401, "authentication_error")


def test_another_users_knowledge_base_is_404_on_upload_and_400_on_predict(stack, kb, db_user_factory, nothing_stored):
    stranger = token_create(user=db_user_factory())[1]
    assert_error(upload(stack.url, stranger, kb.name, "a.txt", b"text"), 404, "not_found_error", "knowledge_base")
    body = {"prompt": "What is in it?", "langchain": True, "knowledge_base": kb.name}
    response = requests.post(stack.predict_url(), headers={"Authorization": stranger}, json=body, timeout=60)
    assert_error(response, 400, "invalid_request_error", "knowledge_base")


def test_shared_knowledge_base_may_be_read_but_not_written(stack, kb, db_user_factory, nothing_stored):
    friend = db_user_factory()
    kb.shared_with.add(friend)
    raw = token_create(user=friend)[1]
    assert requests.get(documents_url(stack.url, kb.name), headers={"Authorization": raw}, timeout=30).status_code == 200
    assert_error(upload(stack.url, raw, kb.name, "a.txt", b"text"), 403, "permission_error", "knowledge_base")


def test_superuser_may_use_every_knowledge_base(stack, kb, db_user_factory):
    admin = token_create(user=db_user_factory(is_superuser=True, is_staff=True))[1]
    response = upload(stack.url, admin, kb.name, "from-admin.txt", txt_file("The admin's note."))
    assert response.status_code == 202, response.text


def test_predict_with_langchain_and_no_default_knowledge_base_is_400(stack, token, nothing_stored):
    body = {"prompt": "What is the code?", "langchain": True}
    response = requests.post(stack.predict_url(), headers={"Authorization": token}, json=body, timeout=60)
    error = assert_error(response, 400, "invalid_request_error", "knowledge_base")
    assert "default" in error["message"]


def test_bad_knowledge_base_name_in_ingest_command_stores_nothing(stack, user, tmp_path, nothing_stored):
    from django.core.management import CommandError, call_command

    good = tmp_path / "a.txt"
    good.write_text("text")
    with pytest.raises(CommandError, match="Bad knowledge base name"):
        call_command("ingest", "bad name!", str(good), "--owner", user.username)
    assert not KnowledgeBase.objects.filter(name="bad name!").exists()
