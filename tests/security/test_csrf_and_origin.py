"""Case 15: every form and state-changing page request needs the CSRF token (a client that omits it
gets 403 and nothing changes); the only views exempt from CSRF are the token APIs, which take no
cookies; the browser's chat socket refuses a foreign or missing Origin."""

import uuid

import pytest
import requests
import websocket
from django.urls import URLPattern, URLResolver, get_resolver

from chat.models import Conversation, Deployment
from chat.tokens import token_create
from knowledge import services as knowledge_services
from knowledge.models import Document, KnowledgeBase
from tests.security.conftest import csrf, site_session

# The views that take no CSRF token: each authenticates by the Authorization header only.
TOKEN_API_VIEWS = {"chat.views.predict", "knowledge.views.documents"}


def all_patterns(patterns=None, prefix=""):
    for entry in patterns if patterns is not None else get_resolver().url_patterns:
        if isinstance(entry, URLResolver):
            yield from all_patterns(entry.url_patterns, prefix + str(entry.pattern))
        elif isinstance(entry, URLPattern):
            yield prefix + str(entry.pattern), entry.callback


def test_only_the_token_apis_are_exempt_from_csrf():
    exempt = {}
    for route, view in all_patterns():
        if getattr(view, "csrf_exempt", False):
            exempt[route] = f"{view.__module__}.{view.__name__}"
    ninja = {route for route, name in exempt.items() if name.startswith("ninja.")}
    assert ninja and all(route.startswith(("v1/", "api/schema", "api/docs")) for route in ninja), ninja
    assert {name for name in exempt.values() if not name.startswith("ninja.")} == TOKEN_API_VIEWS, exempt


def test_token_apis_ignore_the_session_cookie(stack, site_user):
    """So a forged cross-site request, which carries only cookies, is refused without a CSRF token."""
    user, password = site_user
    session = site_session(stack.url, user.username, password)
    kb, _ = knowledge_services.knowledge_base_get_or_create(name=f"kb-{uuid.uuid4().hex[:10]}", owner=user)
    assert session.post(stack.predict_url(), json={"prompt": "Hi"}, timeout=60).status_code == 401
    assert session.post(f"{stack.url}/v1/completions", json={"model": "default", "prompt": "Hi"}, timeout=60).status_code == 401
    upload = session.post(f"{stack.url}/api/knowledge/{kb.name}/documents", files={"file": ("a.md", b"# a")}, timeout=60)
    assert upload.status_code == 401
    assert not Document.objects.filter(knowledge_base=kb).exists()


@pytest.fixture
def logged_in(stack, site_user):
    user, password = site_user
    user.is_staff = user.is_superuser = True  # the admin's forms too
    user.save()
    return user, site_session(stack.url, user.username, password)


def test_every_state_changing_page_request_without_the_csrf_token_is_403(stack, logged_in):
    user, session = logged_in
    conversation = Conversation.objects.create(user=user, title="keep me", deployment=Deployment.objects.get(name="default"))
    kb, _ = knowledge_services.knowledge_base_get_or_create(name=f"kb-{uuid.uuid4().hex[:10]}", owner=user)
    document, _ = knowledge_services.document_create(knowledge_base=kb, name="keep.md", data=b"# Keep\n\nme")
    new_kb = f"kb-{uuid.uuid4().hex[:10]}"
    forms = [
        (f"/c/{conversation.pk}/rename", {"title": "renamed"}, None),
        (f"/c/{conversation.pk}/delete", {}, None),
        ("/knowledge/", {"name": new_kb}, None),
        (f"/knowledge/{kb.name}/upload", {}, {"file": ("more.md", b"# More\n\ntext")}),
        (f"/knowledge/{kb.name}/documents/{document.pk}/delete", {}, None),
        ("/admin/chat/apitoken/add/", {"user": user.pk, "name": "forged"}, None),
        ("/accounts/logout/", {}, None),
    ]
    for path, data, files in forms:
        response = session.post(f"{stack.url}{path}", data=data, files=files, allow_redirects=False, timeout=60)
        assert response.status_code == 403, (path, response.status_code)
        assert "CSRF" in response.text, path
    # A token from another session is no better than none.
    stranger = requests.Session()
    stranger.get(f"{stack.url}/accounts/login/", timeout=60)
    forged = {"csrfmiddlewaretoken": stranger.cookies["csrftoken"], "title": "renamed"}
    assert session.post(f"{stack.url}/c/{conversation.pk}/rename", data=forged, allow_redirects=False, timeout=60).status_code == 403
    # The login form itself.
    assert requests.post(f"{stack.url}/accounts/login/", data={"username": user.username, "password": "x"}, timeout=60).status_code == 403

    conversation.refresh_from_db()
    assert conversation.title == "keep me"
    assert Document.objects.filter(pk=document.pk).exists() and kb.documents.count() == 1
    assert not KnowledgeBase.objects.filter(name=new_kb).exists()
    assert not user.api_tokens.filter(name="forged").exists()
    assert session.get(f"{stack.url}/", allow_redirects=False, timeout=60).status_code == 200  # still logged in

    # With the token the same requests work (so the 403s above were CSRF's doing).
    response = session.post(f"{stack.url}/c/{conversation.pk}/rename", data={**csrf(session), "title": "renamed"}, allow_redirects=False, timeout=60)
    assert response.status_code == 302
    conversation.refresh_from_db()
    assert conversation.title == "renamed"


def test_the_chat_socket_refuses_a_foreign_or_missing_origin(stack, site_user):
    user, password = site_user
    session = site_session(stack.url, user.username, password)
    cookie = f"sessionid={session.cookies['sessionid']}"
    url = f"{stack.ws_url}/ws/chat/"
    for origin in ("http://evil.example", "http://127.0.0.1.evil.example", "null"):
        with pytest.raises(websocket.WebSocketBadStatusException) as refused:
            websocket.create_connection(url, cookie=cookie, origin=origin, timeout=30)
        assert refused.value.status_code == 403, origin
    with pytest.raises(websocket.WebSocketBadStatusException) as refused:
        websocket.create_connection(url, cookie=cookie, suppress_origin=True, timeout=30)
    assert refused.value.status_code == 403
    # The site's own origin is let in.
    ws = websocket.create_connection(url, cookie=cookie, origin=stack.url, timeout=30)
    ws.close()


def test_the_predict_socket_takes_no_origin_but_needs_its_token(stack, user):
    raw = token_create(user=user)[1]
    ws = websocket.create_connection(stack.predict_ws_url(), header=[f"Authorization: {raw}"], suppress_origin=True, timeout=30)
    ws.close()
