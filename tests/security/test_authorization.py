"""Case 13: a token limited to one deployment is refused on another however it is sent (raw or
Bearer; HTTP predict, WebSocket predict, /v1); a revoked token is refused at once, even on a socket
opened before; a user reaches none of another user's conversations, documents, knowledge bases or
request rows, by any id, URL or API: 404 (nothing is changed, nothing is generated)."""

import json
import uuid

import pytest
import requests
import websocket

from chat.models import Conversation, Deployment, Message, RequestLog
from chat.tokens import token_create
from knowledge import services as knowledge_services
from knowledge.models import Document
from tests.chat import clients
from tests.security.conftest import csrf, site_session


@pytest.fixture
def other_deployment(stack):
    """A second deployment (a copy of the default on the same worker queue)."""
    deployment = Deployment.objects.get(name="default")
    deployment.pk, deployment.name, deployment.queue = None, f"other-{uuid.uuid4().hex[:8]}", "default"
    deployment.save()
    return deployment


def close_code_of(ws) -> int:
    """Read to the server's close frame; its status code."""
    while True:
        opcode, frame = ws.recv_data_frame(control_frame=True)
        if opcode == websocket.ABNF.OPCODE_CLOSE:
            return int.from_bytes(frame.data[:2], "big")


def test_a_token_limited_to_one_deployment_gets_403_on_another_however_it_is_sent(stack, user, other_deployment):
    limited_raw = token_create(user=user, deployments=[other_deployment])[1]
    rows = RequestLog.objects.count()
    for header in (limited_raw, f"Bearer {limited_raw}", f"bearer   {limited_raw}"):
        response = requests.post(stack.predict_url("default"), headers={"Authorization": header}, json={"prompt": "Hi"}, timeout=60)
        assert response.status_code == 403 and response.json()["error"]["type"] == "permission_error", response.text

        ws = websocket.create_connection(stack.predict_ws_url("default"), header=[f"Authorization: {header}"], timeout=60)
        assert clients.receive_json(ws)["error"]["type"] == "permission_error"
        assert close_code_of(ws) == 4403
        ws.close()

        for path, body in (
            ("/v1/chat/completions", {"model": "default", "messages": [{"role": "user", "content": "Hi"}]}),
            ("/v1/completions", {"model": "default", "prompt": "Hi"}),
        ):
            response = requests.post(f"{stack.url}{path}", headers={"Authorization": header}, json=body, timeout=60)
            assert response.status_code == 403 and response.json()["error"]["type"] == "permission_error", (path, response.text)
        listed = requests.get(f"{stack.url}/v1/models", headers={"Authorization": header}, timeout=60).json()["data"]
        assert "default" not in {m["id"] for m in listed} and other_deployment.name in {m["id"] for m in listed}
        assert requests.get(f"{stack.url}/v1/models/default", headers={"Authorization": header}, timeout=60).status_code == 404
    assert RequestLog.objects.count() == rows  # nothing was generated

    # The same token on its own deployment is served (the refusals above were about scope).
    body = {"prompt": "Hi", "max_new_tokens": 2}
    ok = requests.post(stack.predict_url(other_deployment.name), headers={"Authorization": limited_raw}, json=body, timeout=300)
    assert ok.status_code == 200, ok.text


def test_a_revoked_token_is_refused_at_once_everywhere_even_on_an_open_socket(stack, user, kb_of):
    token, raw = token_create(user=user)
    kb = kb_of(user)
    ws = websocket.create_connection(stack.predict_ws_url(), header=[f"Authorization: {raw}"], timeout=120)
    ws.send(json.dumps({"prompt": "Hi", "max_new_tokens": 2}))
    while clients.receive(ws) != "<EOS>":
        pass

    token.revoke()
    rows = RequestLog.objects.count()
    ws.send(json.dumps({"prompt": "Hi again", "max_new_tokens": 2}))  # the socket was opened before
    assert clients.receive_json(ws)["error"]["type"] == "authentication_error"
    assert close_code_of(ws) == 4401
    ws.close()
    for header in (raw, f"Bearer {raw}"):
        response = requests.post(stack.predict_url(), headers={"Authorization": header}, json={"prompt": "Hi"}, timeout=60)
        assert response.status_code == 401, response.text
        for path in ("/v1/models", f"/api/knowledge/{kb.name}/documents", "/api/health"):
            assert requests.get(f"{stack.url}{path}", headers={"Authorization": header}, timeout=60).status_code == 401, path
        ws = websocket.create_connection(stack.predict_ws_url(), header=[f"Authorization: {header}"], timeout=60)
        assert clients.receive_json(ws)["error"]["type"] == "authentication_error"
        assert close_code_of(ws) == 4401
        ws.close()
    assert RequestLog.objects.count() == rows


@pytest.fixture
def kb_of():
    def make(user):
        kb, _ = knowledge_services.knowledge_base_get_or_create(name=f"kb-{uuid.uuid4().hex[:10]}", owner=user)
        return kb

    return make


def test_another_users_things_are_404_by_every_page_socket_and_api(stack, site_user, db_user_factory, kb_of):
    owner = db_user_factory()
    mine = Conversation.objects.create(user=owner, title="owner's secret plans", deployment=Deployment.objects.get(name="default"))
    Message.objects.create(conversation=mine, role=Message.Role.USER, content="the secret question")
    Message.objects.create(conversation=mine, role=Message.Role.ASSISTANT, content="the secret answer")
    kb = kb_of(owner)
    document, _ = knowledge_services.document_create(knowledge_base=kb, name="secret.md", data=b"# Secret\n\nThe vault code is 4411.")
    owner_token = token_create(user=owner)[1]
    requests.post(stack.predict_url(), headers={"Authorization": owner_token}, json={"prompt": "Hi", "max_new_tokens": 2}, timeout=300)
    owner_row = RequestLog.objects.filter(user=owner).latest("queued_at")

    stranger, password = site_user
    session = site_session(stack.url, stranger.username, password)
    stranger_kb = kb_of(stranger)
    stranger_token = token_create(user=stranger)[1]
    api = {"Authorization": stranger_token}

    # Pages: read, rename, delete a conversation; a knowledge base's page, its list, upload, delete.
    for method, path in [
        ("get", f"/c/{mine.pk}/"),
        ("post", f"/c/{mine.pk}/rename"),
        ("post", f"/c/{mine.pk}/delete"),
        ("get", f"/knowledge/{kb.name}/"),
        ("get", f"/knowledge/{kb.name}/documents.json"),
        ("post", f"/knowledge/{kb.name}/upload"),
        ("post", f"/knowledge/{kb.name}/documents/{document.pk}/delete"),
        ("post", f"/knowledge/{stranger_kb.name}/documents/{document.pk}/delete"),  # by id, through one's own
    ]:
        data = {**csrf(session), "title": "mine now"} if method == "post" else None
        files = {"file": ("x.md", b"# x")} if path.endswith("upload") else None
        response = getattr(session, method)(f"{stack.url}{path}", data=data, files=files, allow_redirects=False, timeout=60)
        if path.startswith(f"/knowledge/{stranger_kb.name}/"):  # one's own page: redirect with an error message
            assert response.status_code == 302, (path, response.status_code)
        else:
            assert response.status_code == 404, (path, response.status_code)
        assert "secret" not in response.text, path
    assert session.get(f"{stack.url}/conversations/", timeout=60).text.count("secret plans") == 0
    assert kb.name not in session.get(f"{stack.url}/knowledge/", timeout=60).text
    assert Conversation.objects.get(pk=mine.pk).title == "owner's secret plans"
    assert Document.objects.filter(pk=document.pk).exists()

    # The knowledge API: the knowledge base by name, the document by id (also through one's own).
    for path in (f"/api/knowledge/{kb.name}/documents", f"/api/knowledge/{kb.name}/documents/{document.pk}",
                 f"/api/knowledge/{stranger_kb.name}/documents/{document.pk}"):
        response = requests.get(f"{stack.url}{path}", headers=api, timeout=60)
        assert response.status_code == 404 and "secret" not in response.text, (path, response.text)
    response = requests.post(f"{stack.url}/api/knowledge/{kb.name}/documents", headers=api, files={"file": ("x.md", b"# x")}, timeout=60)
    assert response.status_code == 404, response.text
    assert Document.objects.filter(knowledge_base=kb).count() == 1

    # The chat socket: continue or regenerate the owner's conversation, attach the owner's knowledge base.
    rows = RequestLog.objects.count()
    ws = websocket.create_connection(
        f"{stack.ws_url}/ws/chat/", cookie=f"sessionid={session.cookies['sessionid']}", origin=stack.url, timeout=60
    )
    try:
        for message in (
            {"type": "send", "conversation": str(mine.pk), "deployment": "default", "prompt": "Continue", "max_new_tokens": 2},
            {"type": "regenerate", "conversation": str(mine.pk), "deployment": "default", "max_new_tokens": 2},
            {"type": "send", "deployment": "default", "prompt": "What is the vault code?", "knowledge_base": kb.name, "max_new_tokens": 2},
        ):
            ws.send(json.dumps(message))
            answer = clients.receive_json(ws)
            assert answer["type"] == "error", answer
            assert "secret" not in json.dumps(answer) and "4411" not in json.dumps(answer)
    finally:
        ws.close()
    assert RequestLog.objects.count() == rows
    assert Message.objects.filter(conversation=mine).count() == 2

    # Knowledge on the APIs: langchain with the owner's knowledge base is refused as unknown.
    body = {"prompt": "What is the vault code?", "langchain": True, "knowledge_base": kb.name}
    response = requests.post(stack.predict_url(), headers=api, json=body, timeout=60)
    assert response.status_code == 400 and response.json()["error"]["param"] == "knowledge_base"
    body = {"model": "default", "messages": [{"role": "user", "content": "The vault code?"}], "knowledge_base": kb.name}
    response = requests.post(f"{stack.url}/v1/chat/completions", headers=api, json=body, timeout=60)
    assert response.status_code in (400, 404) and "4411" not in response.text

    # Request rows live only in the admin, which a non-staff user cannot open.
    response = session.get(f"{stack.url}/admin/chat/requestlog/{owner_row.pk}/change/", allow_redirects=False, timeout=60)
    assert response.status_code == 302 and "/admin/login/" in response.headers["Location"]
    assert RequestLog.objects.count() == rows
