"""The token APIs (/api/predict/, /v1/) have their own ASGI handler with a short middleware list
(llmsite/middleware.py); the site keeps Django's. Driven through the real ASGI application."""

import json

from asgiref.testing import ApplicationCommunicator


async def call(path: str, method: str = "GET", body: bytes = b"", headers=()):
    from llmsite.asgi import application

    scope = {
        "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": method, "scheme": "http",
        "path": path, "raw_path": path.encode(), "query_string": b"", "root_path": "",
        "headers": [(b"host", b"127.0.0.1"), *headers], "client": ("127.0.0.1", 5000), "server": ("127.0.0.1", 80),
    }
    app = ApplicationCommunicator(application, scope)
    await app.send_input({"type": "http.request", "body": body, "more_body": False})
    start = await app.receive_output(10)
    content = b""
    while True:
        message = await app.receive_output(10)
        content += message.get("body", b"")
        if not message.get("more_body"):
            break
    return start["status"], {k.decode().lower(): v.decode() for k, v in start["headers"]}, content


async def test_predict_answers_with_the_security_headers_and_no_session_machinery():
    status, headers, content = await call("/api/predict/default", "POST", b'{"prompt": "hi"}', [(b"content-type", b"application/json")])
    assert status == 401 and "API token" in json.loads(content)["error"]["message"]
    assert headers["x-content-type-options"] == "nosniff"  # SecurityMiddleware, run inline
    assert "referrer-policy" in headers
    assert "cookie" not in headers.get("vary", "").lower()  # no session middleware on token APIs


async def test_openai_api_goes_through_the_token_handler_and_pages_through_the_site_one():
    status, headers, _ = await call("/v1/models")
    assert status == 401 and headers["x-content-type-options"] == "nosniff"
    assert "x-frame-options" not in headers
    status, headers, _ = await call("/accounts/login/")
    assert status == 200
    assert headers["x-frame-options"] == "DENY"  # the site's own middleware list
    assert "csrftoken" in headers.get("set-cookie", "")


def test_static_files_are_served_under_asgi():
    import asyncio

    from django.contrib.staticfiles import finders

    assert finders.find("admin/css/base.css")
    status, headers, content = asyncio.run(call("/static/admin/css/base.css"))
    assert status == 200 and b"{" in content and "text/css" in headers["content-type"]
