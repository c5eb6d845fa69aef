"""NUL characters (U+0000) wherever a client's text meets PostgreSQL, whose text and jsonb refuse
them (psycopg raises DataError, which the site answered as 503 "database unavailable" or 500).

Text that is stored shows them as U+FFFD; a name that is looked up finds nothing (no name holds
one); a path or query string of the site's pages that holds one is refused with 400 naming it.
The Responses API's cases are in tests/openai_api/test_responses.py.
"""

import json
import uuid
from urllib.parse import quote

import pytest
import requests

from chat.models import Conversation, Message
from knowledge.models import Chunk, KnowledgeBase
from tests.chat import clients
from tests.chat.test_chat_socket import chat_socket, until_done
from tests.chat.test_predict_errors import assert_error
from tests.knowledge.conftest import txt_file, upload, wait_done
from tests.security.conftest import site_session

NUL = "\x00"


def test_a_chat_turn_with_nul_characters_is_answered_and_stored_with_replacement_characters(stack, user):
    socket = chat_socket(stack, user)
    try:
        socket.send(json.dumps({
            "type": "send", "deployment": "default", "max_new_tokens": 4, "temperature": 0,
            "prompt": f"Say{NUL} hello", "system_prompt": f"Be{NUL} brief.",
        }))
        received = until_done(socket)
        assert received[-1]["type"] == "done", received
        # The conversation goes on: the next turn's history is the stored first one.
        conversation = Conversation.objects.get(user=user)
        socket.send(json.dumps({
            "type": "send", "deployment": "default", "conversation": str(conversation.pk), "max_new_tokens": 4,
            "prompt": f"Again{NUL}", "system_prompt": f"Be{NUL} brief.",
        }))
        assert until_done(socket)[-1]["type"] == "done"
    finally:
        socket.close()
    conversation.refresh_from_db()
    assert conversation.title == "Say\ufffd hello" and conversation.system_prompt == "Be\ufffd brief."
    questions = Message.objects.filter(conversation=conversation, role=Message.Role.USER).order_by("id")
    assert [m.content for m in questions] == ["Say\ufffd hello", "Again\ufffd"]
    answers = Message.objects.filter(conversation=conversation, role=Message.Role.ASSISTANT)
    assert [m.status for m in answers] == [Message.Status.OK, Message.Status.OK]


def test_deployment_names_with_nul_characters_are_unknown(stack, token, user):
    response = requests.post(stack.predict_url(quote(f"default{NUL}")), headers={"Authorization": token}, json={"prompt": "hi"}, timeout=60)
    assert_error(response, 404, "not_found_error", "deployment")
    response = requests.post(
        f"{stack.url}/v1/chat/completions", headers={"Authorization": f"Bearer {token}"},
        json={"model": f"default{NUL}", "messages": [{"role": "user", "content": "hi"}]}, timeout=60,
    )
    assert response.status_code == 404, response.text
    socket = chat_socket(stack, user)
    try:
        socket.send(json.dumps({"type": "send", "deployment": f"default{NUL}", "prompt": "hi"}))
        reply = clients.receive_json(socket)
    finally:
        socket.close()
    assert reply["type"] == "error" and reply["param"] == "deployment", reply
    assert not Conversation.objects.filter(user=user).exists()


def test_a_path_or_query_string_with_a_nul_character_is_refused_naming_it(stack, db_user_factory, token):
    """An admin list filtered on a value with a NUL answered 500 (DataError); every query string
    is checked the same way, the admin's searches, the usage page and the site's search included."""
    from django.contrib import admin

    password = uuid.uuid4().hex
    operator = db_user_factory(is_staff=True, is_superuser=True)
    operator.set_password(password)
    operator.save()
    session = site_session(stack.url, operator.username, password)
    pages = [(f"/admin/{m._meta.app_label}/{m._meta.model_name}/", "q") for m, a in admin.site._registry.items() if a.search_fields]
    assert {"/admin/chat/requestlog/", "/admin/knowledge/document/", "/admin/auth/user/"} <= {path for path, _ in pages}
    pages += [("/admin/chat/requestlog/", "status"), ("/admin/usage/", "deployment"), ("/conversations/", "q")]
    for path, name in pages:
        response = session.get(f"{stack.url}{path}", params={name: f"a{NUL}b"}, timeout=30)
        assert (response.status_code, response.text) == (400, f"{name}: must not contain NUL characters."), path
    # And a path: the admin's page of a stored response (its id is text) was a 500.
    for path in ("/admin/chat/storedresponse/resp_%00/change/", "/knowledge/kb%00/"):
        response = session.get(f"{stack.url}{path}", timeout=30)
        assert (response.status_code, response.text) == (400, "path: must not contain NUL characters."), path

    # An API path answers in its JSON error shape.
    response = requests.get(
        f"{stack.url}/api/requests/{uuid.uuid4()}/events", params={"last_event_id": f"1-{NUL}"},
        headers={"Authorization": token}, timeout=30,
    )
    assert_error(response, 400, "invalid_request_error", "last_event_id")
    response = requests.get(f"{stack.url}/api/knowledge/kb%00/documents", headers={"Authorization": token}, timeout=30)
    assert_error(response, 400, "invalid_request_error", "path")


@pytest.fixture
def kb(user):
    return KnowledgeBase.objects.create(name=f"kb-{uuid.uuid4().hex[:10]}", owner=user)


def test_a_document_with_nul_characters_is_stored_with_replacement_characters(stack, token, kb):
    data = txt_file(f"The gate code of Vellum{NUL} Hall is 2207.", "Its porter is named Brann.")
    response = upload(stack.url, token, kb.name, "vellum.txt", data)
    assert response.status_code == 202, response.text
    done = wait_done(stack.url, token, kb.name, response.json()["id"])
    assert done["status"] == "ready", done
    texts = "".join(Chunk.objects.filter(document_id=done["id"]).values_list("text", flat=True))
    assert "Vellum\ufffd Hall" in texts and NUL not in texts

    # A question with a NUL is answered from the knowledge base (the text search failed on it).
    body = {"prompt": f"What is the gate{NUL}code of Vellum Hall?", "langchain": True, "knowledge_base": kb.name,
            "temperature": 0, "max_new_tokens": 16}
    response = requests.post(stack.predict_url(), headers={"Authorization": token}, json=body, timeout=300)
    assert response.status_code == 200, response.text
    assert [s["document"] for s in response.json()["sources"]][:1] == ["vellum.txt"], response.json()
