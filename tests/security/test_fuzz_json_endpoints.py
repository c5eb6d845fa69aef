"""Case 9: hypothesis throws random JSON, wrong types, huge numbers, NaN, invalid UTF-8, deep nesting
and oversize bodies at every JSON endpoint of the site, on the real stack.

For every example: no 5xx; no stack trace or internal path in the body; a refused request (4xx)
stored and enqueued nothing (RequestLog rows and documents unchanged). Valid requests are allowed to
succeed: they go to a copy of the default deployment capped at a 64-token context and 4 new tokens,
so the run stays short. The number of examples run is printed in pytest's summary and written to
`<data dir>/fuzz-examples.json`.
"""

import json
import string
import time
from pathlib import Path
from urllib.parse import quote

import pytest
import requests
import websocket
from django.conf import settings
from hypothesis import HealthCheck, Phase, given
from hypothesis import settings as hsettings
from hypothesis import strategies as st

from chat.models import RequestLog
from chat.tokens import token_create
from knowledge.models import Document, KnowledgeBase
from tests.chat import clients
from tests.security.conftest import site_session

EXAMPLES = {}  # test name -> examples run, for the summary
LEAKS = ("Traceback", 'File "', "site-packages", str(settings.BASE_DIR), "django.db", "psycopg")
TIMEOUT = 120


def fuzz(max_examples):
    # No shrinking: on this shared machine every shrink step is a real request; a failure is
    # reported with the example as generated.
    return hsettings(
        max_examples=max_examples,
        deadline=None,
        database=None,
        suppress_health_check=list(HealthCheck),
        phases=[Phase.explicit, Phase.generate],
        print_blob=False,
    )


def counted(name):
    EXAMPLES[name] = EXAMPLES.get(name, 0) + 1
    path = Path(settings.DATA_DIR) / "fuzz-examples.json"
    path.write_text(json.dumps(EXAMPLES, indent=1))


# --- what is thrown ---------------------------------------------------------------------------

huge_ints = st.integers(min_value=2**63, max_value=10**400) | st.integers(max_value=-(2**63), min_value=-(10**400))
scalars = (
    st.none()
    | st.booleans()
    | st.integers()
    | huge_ints
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=40)
)
json_values = st.recursive(
    scalars, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3), max_leaves=8
)


def objects(fields, base):
    """A valid-looking body with fields replaced by anything, or a random object of those names."""
    mutated = st.builds(
        lambda extra: {**base, **extra}, st.dictionaries(st.sampled_from(fields) | st.text(max_size=8), json_values, min_size=1, max_size=3)
    )
    return mutated | st.dictionaries(st.sampled_from(fields), json_values, max_size=5)


def encode(value) -> bytes:
    return json.dumps(value, allow_nan=True, ensure_ascii=False).encode("utf-8", "surrogatepass")


def nested(depth: int, kind: str) -> bytes:
    return (kind[0] * depth + kind[1] * depth).encode() if kind != "obj" else (b'{"a":' * depth + b"1" + b"}" * depth)


def raw_bodies():
    limit = settings.PREDICT_MAX_BODY_BYTES
    return st.one_of(
        st.binary(max_size=300),  # mostly invalid UTF-8
        st.builds(nested, st.integers(min_value=100, max_value=200_000), st.sampled_from(["[]", "obj"])),
        st.builds(lambda n: b'{"prompt": "' + b"x" * n + b'"}', st.integers(min_value=limit + 1, max_value=limit + 4096)),
        st.sampled_from([b"NaN", b"Infinity", b'{"temperature": NaN}', b'{"max_new_tokens": 1e999}', b"9" * 5000, b"", b"null"]),
    )


def bodies(fields, base):
    return st.one_of(objects(fields, base).map(encode), json_values.map(encode), raw_bodies())


content_types = st.sampled_from(
    ["application/json", "application/json; charset=latin-1", "text/plain", "", "application/x-www-form-urlencoded", "multipart/form-data; boundary=zz"]
)


# --- the checks -------------------------------------------------------------------------------


def assert_clean(response, rows_before, documents_before=None, json_errors=True):
    sent = response.request
    assert response.status_code < 500, (response.status_code, response.text[:500], sent.url, sent.headers, (sent.body or b"")[:300])
    text = response.content.decode("utf-8", "replace")
    for leak in LEAKS:
        assert leak not in text, (leak, text[:500])
    if response.status_code >= 400:
        assert RequestLog.objects.count() == rows_before, f"a refused request was stored: {text[:300]}"
        if documents_before is not None:
            assert Document.objects.count() == documents_before
        if response.headers.get("Content-Type", "").startswith("application/json"):
            assert response.json()["error"]["message"]
        elif sent.headers.get("Content-Type", "").startswith("multipart/") and response.status_code == 400:
            # Daphne's HTTP server (Twisted) refuses a malformed multipart body itself, before the
            # site sees it: 400 with an empty body. A refusal all the same, and it leaks nothing.
            assert not text
        else:  # only Django's own page for a path that no route matches is not JSON
            assert not json_errors or response.status_code == 404, (response.status_code, text[:300], sent.url, sent.headers, (sent.body or b"")[:300])


@pytest.fixture(scope="module", autouse=True)
def _summary():
    yield
    print(f"\nhypothesis examples run: {EXAMPLES} (total {sum(EXAMPLES.values())})")


@pytest.fixture
def auth(stack, user):
    return token_create(user=user)[1]


PREDICT_FIELDS = [
    "prompt", "system_prompt", "history", "max_new_tokens", "temperature", "top_k", "top_p", "do_sample",
    "use_cache", "use_stream_chat", "langchain", "knowledge_base", "return_sources",
]


def test_predict_http_answers_random_bodies_with_4xx_only(stack, capped, auth):
    base = {"prompt": "Hi", "max_new_tokens": 2}
    headers = st.sampled_from([auth, f"Bearer {auth}", f"bearer  {auth} ", "", "Bearer", "llm-" + "A" * 43]) | st.text(
        alphabet=string.printable.strip(), max_size=60
    )

    @given(body=bodies(PREDICT_FIELDS, base), content_type=content_types, authorization=headers, name=st.just(capped.name) | st.text(max_size=20))
    @fuzz(100)
    def check(body, content_type, authorization, name):
        counted("predict_http")
        rows = RequestLog.objects.count()
        response = requests.post(
            f"{stack.url}/api/predict/{quote(name, safe='')}",
            data=body,
            headers={"Content-Type": content_type, "Authorization": authorization},
            timeout=TIMEOUT,
        )
        assert_clean(response, rows)

    check()


CHAT_FIELDS = ["model", "messages", "temperature", "top_p", "max_tokens", "stop", "seed", "n", "stream", "stream_options", "knowledge_base"]
COMPLETION_FIELDS = ["model", "prompt", "temperature", "top_p", "max_tokens", "stop", "seed", "n", "stream", "echo", "stream_options"]
EMBEDDING_FIELDS = ["model", "input", "dimensions", "encoding_format", "user"]


@pytest.mark.parametrize(
    "path, fields, base, examples",
    [
        ("/v1/chat/completions", CHAT_FIELDS, {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}, 70),
        ("/v1/completions", COMPLETION_FIELDS, {"prompt": "Hi", "max_tokens": 2}, 50),
        ("/v1/embeddings", EMBEDDING_FIELDS, {"model": "default", "input": "Hi"}, 50),
    ],
)
def test_v1_answers_random_bodies_with_4xx_only(stack, capped, auth, path, fields, base, examples):
    if "model" not in base:
        base = {**base, "model": capped.name}

    @given(body=bodies(fields, base), content_type=content_types)
    @fuzz(examples)
    def check(body, content_type):
        counted(path)
        rows = RequestLog.objects.count()
        response = requests.post(
            f"{stack.url}{path}", data=body, headers={"Content-Type": content_type, "Authorization": f"Bearer {auth}"}, timeout=TIMEOUT
        )
        assert_clean(response, rows)

    check()


def test_knowledge_api_answers_random_requests_with_4xx_only(stack, user, auth):
    kb = KnowledgeBase.objects.create(name=f"fuzz-{user.pk}", owner=user)
    names = st.text(max_size=30) | st.builds(lambda stem, ext: f"{stem}.{ext}", st.text(max_size=20), st.sampled_from(["txt", "md", "pdf", "docx", "exe", ""]))

    @given(
        kind=st.sampled_from(["json", "multipart", "get"]),
        body=bodies(["file", "name"], {"file": "x"}),
        file_name=names,
        content=st.binary(max_size=200),
        kb_name=st.just(kb.name) | st.text(max_size=20),
        document_id=st.integers(min_value=0, max_value=2**70),
    )
    @fuzz(60)
    def check(kind, body, file_name, content, kb_name, document_id):
        counted("knowledge_api")
        rows, documents = RequestLog.objects.count(), Document.objects.count()
        url = f"{stack.url}/api/knowledge/{quote(kb_name, safe='')}/documents"
        headers = {"Authorization": auth}
        if kind == "json":
            response = requests.post(url, data=body, headers={**headers, "Content-Type": "application/json"}, timeout=TIMEOUT)
        elif kind == "multipart":
            response = requests.post(url, files={"file": (file_name, content)}, headers=headers, timeout=TIMEOUT)
        else:
            response = requests.get(f"{url}/{document_id}", headers=headers, timeout=TIMEOUT)
        assert_clean(response, rows, documents)

    check()


SEND_FIELDS = ["type", "conversation", "deployment", "prompt", "system_prompt", "temperature", "top_p", "top_k", "max_new_tokens", "knowledge_base"]


def test_chat_socket_answers_random_messages_with_an_error_and_stays_open(stack, capped, site_user):
    user, password = site_user
    session = site_session(stack.url, user.username, password)
    ws = websocket.create_connection(
        f"{stack.ws_url}/ws/chat/", cookie=f"sessionid={session.cookies['sessionid']}", origin=stack.url, timeout=TIMEOUT
    )
    base = {"type": "send", "deployment": capped.name, "prompt": "Hi", "max_new_tokens": 2}

    def reply() -> dict:
        """The socket's answer to one message: an error, or a whole turn up to its end."""
        until = time.monotonic() + TIMEOUT
        while True:
            message = clients.receive_json(ws, until=until)
            if message["type"] in ("error", "done"):
                return message

    try:

        # "stop" is answered with silence; a message over the size limit may close the socket.
        small = bodies(SEND_FIELDS, base).filter(lambda b: b'"stop"' not in b and len(b) <= settings.PREDICT_MAX_BODY_BYTES)

        @given(message=small)
        @fuzz(50)
        def check(message):
            counted("chat_socket")
            rows = RequestLog.objects.count()
            try:
                text = message.decode("utf-8")
            except UnicodeDecodeError:
                ws.send_binary(message)
            else:
                ws.send(text)
            answer = reply()
            for leak in LEAKS:
                assert leak not in json.dumps(answer), answer
            if answer["type"] == "error":
                assert answer["message"]
                assert RequestLog.objects.count() == rows

        check()
    finally:
        ws.close()


def test_site_forms_answer_random_input_with_4xx_or_a_message_only(stack, site_user):
    from chat.models import Conversation

    user, password = site_user
    session = site_session(stack.url, user.username, password)
    conversation = Conversation.objects.create(user=user, title="mine")

    @given(
        title=st.text(max_size=300),
        name=st.text(max_size=80),
        query=st.text(max_size=40),
        target=st.sampled_from(["rename", "create", "search", "documents"]),
    )
    @fuzz(40)
    def check(title, name, query, target):
        counted("site_forms")
        rows = RequestLog.objects.count()
        token = {"csrfmiddlewaretoken": session.cookies["csrftoken"]}
        if target == "rename":
            response = session.post(f"{stack.url}/c/{conversation.pk}/rename", data={**token, "title": title}, timeout=TIMEOUT)
        elif target == "create":
            response = session.post(f"{stack.url}/knowledge/", data={**token, "name": name}, timeout=TIMEOUT)
        elif target == "search":
            response = session.get(f"{stack.url}/conversations/", params={"q": query}, timeout=TIMEOUT)
        else:
            response = session.get(f"{stack.url}/knowledge/{quote(name, safe='')}/documents.json", timeout=TIMEOUT)
        assert_clean(response, rows, json_errors=False)

    check()
