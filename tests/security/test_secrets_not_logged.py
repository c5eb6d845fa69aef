"""Case 14: no secret reaches a log or an error body. Requests carry a real API token (raw and
Bearer, HTTP, WebSocket and /v1), a revoked one and a mistyped one; a login fails with a wrong
password and another succeeds; then the web and worker logs written meanwhile, and every body
answered, are searched for the tokens, the passwords and SECRET_KEY."""

import json

import requests
import websocket
from django.conf import settings

from chat.tokens import token_create
from tests.chat import clients
from tests.security.conftest import login


def log_offsets(stack) -> dict:
    return {p: p.log_path.stat().st_size for p in (stack.web, stack.worker)}


def logs_since(offsets: dict) -> str:
    text = ""
    for process, offset in offsets.items():
        with open(process.log_path, "rb") as f:
            f.seek(offset)
            text += f.read().decode("utf-8", "replace")
    return text


def test_tokens_passwords_and_the_secret_key_appear_in_no_log_or_error_body(stack, site_user):
    user, password = site_user
    token, raw = token_create(user=user)
    revoked, revoked_raw = token_create(user=user)
    revoked.revoke()
    mistyped = raw[:-3] + "xyz"
    wrong_password = "pw-wrong-" + password[3:]
    offsets = log_offsets(stack)
    bodies = []

    for header in (raw, f"Bearer {raw}", revoked_raw, f"Bearer {mistyped}"):
        for body in ({"prompt": "Hi", "max_new_tokens": 2}, {"prompt": "Hi", "temperature": "hot"}, b"\xff\xfe not utf-8"):
            kwargs = {"data": body} if isinstance(body, bytes) else {"json": body}
            response = requests.post(stack.predict_url(), headers={"Authorization": header}, timeout=300, **kwargs)
            bodies.append(response.text)
        for path, body in (
            ("/v1/chat/completions", {"model": "default", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}),
            ("/v1/completions", {"model": "default", "prompt": "Hi", "max_tokens": "two"}),
            ("/v1/embeddings", {"model": "nope", "input": "Hi"}),
        ):
            bodies.append(requests.post(f"{stack.url}{path}", headers={"Authorization": header}, json=body, timeout=300).text)
        bodies.append(requests.get(f"{stack.url}/api/knowledge/no-such-kb/documents", headers={"Authorization": header}, timeout=60).text)
        ws = websocket.create_connection(stack.predict_ws_url(), header=[f"Authorization: {header}"], timeout=300)
        try:
            ws.send(json.dumps({"prompt": "Hi", "max_new_tokens": 2}))
            while (message := clients.receive(ws)) not in ("<EOS>", ""):
                bodies.append(message)
        except (websocket.WebSocketConnectionClosedException, BrokenPipeError, ConnectionResetError):
            pass  # a refused token: the server closed the socket after its error message
        finally:
            ws.close()

    failed = login(stack.url, user.username, wrong_password)
    assert failed.status_code == 200
    bodies.append(failed.text)
    ok = login(stack.url, user.username, password)
    assert ok.status_code == 302

    logs = logs_since(offsets)
    assert "AXES: New login failure" in logs, "the failed login was not logged: the search below would prove nothing"
    secrets = {"token": raw, "revoked token": revoked_raw, "mistyped token": mistyped, "password": password,
               "wrong password": wrong_password, "SECRET_KEY": settings.SECRET_KEY}
    for what, secret in secrets.items():
        assert secret not in logs, f"the {what} is in the logs"
        for body in bodies:
            assert secret not in body, f"the {what} is in an error body: {body[:200]}"
    # The digest is not a secret, but only the prefix of a token is ever shown.
    assert token.prefix == raw[:10]
