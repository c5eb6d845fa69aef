"""Resumable answers (issue 22, part 1): the chat socket's event ids and resume, on the same or
another web process; GET /api/requests/<id>/events; X-Request-Id; the disconnect grace period.

The suite's processes run with RESUME_GRACE_SECONDS=1 (tests/conftest.py)."""

import concurrent.futures
import json
import time

import pytest
import requests

from chat import events
from chat.conversations import _answered_pairs, answer_settle
from chat.models import Conversation, Message, RequestLog
from llmsite import contract
from tests.chat import clients
from tests.chat.test_chat_socket import chat_socket, until_done
from tests.conftest import start_web
from tests.metrics.conftest import scrape, value, wait_until

STORY = {"type": "send", "deployment": "default", "temperature": 0, "max_new_tokens": 160, "prompt": "Tell me a long story about a lighthouse keeper."}


class _Url:
    def __init__(self, url):
        self.url, self.ws_url = url, "ws" + url[len("http") :]


def first_deltas(socket, n: int, story: dict = STORY) -> tuple[dict, str, list[dict]]:
    """Send the story and read until `n` deltas arrived: (the turn, the request id, the deltas)."""
    socket.send(json.dumps(story))
    turn, request_id, deltas, until = None, None, [], time.monotonic() + 300
    while len(deltas) < n:
        message = clients.receive_json(socket, until=until)
        assert message["type"] not in ("done", "error"), message
        if message["type"] == "turn":
            turn = message
        elif message["type"] == "request":
            request_id = message["request"]
        elif message["type"] == "delta":
            deltas.append(message)
    return turn, request_id, deltas


def resume(stack_or_url, user, request_id, last_event) -> list[dict]:
    socket = chat_socket(stack_or_url, user)
    try:
        socket.send(json.dumps({"type": "resume", "request": request_id, "last_event": last_event}))
        return until_done(socket)
    finally:
        socket.close()


def stored_answer(turn) -> Message:
    answer = Message.objects.get(pk=turn["answer"]["id"])
    deadline = time.monotonic() + 120  # bounds the wait; no speed is asserted
    while answer.status == Message.Status.STREAMING and time.monotonic() < deadline:
        time.sleep(0.2)
        answer.refresh_from_db()
    return answer


@pytest.mark.parametrize("where", ["start", "middle"])
def test_a_dropped_chat_socket_resumes_with_exactly_the_missing_text(stack, user, where):
    socket = chat_socket(stack, user)
    turn, request_id, before = first_deltas(socket, 1 if where == "start" else 8)
    socket.close()  # the connection drops mid-answer
    after = resume(stack, user, request_id, before[-1]["id"])

    assert after[-1]["type"] == "done", after
    deltas = [m for m in after if m["type"] == "delta"]
    ids = [m["id"] for m in before + deltas]
    assert len(set(ids)) == len(ids)  # no event twice
    text = "".join(m["text"] for m in before + deltas)
    answer = stored_answer(turn)
    assert text == after[-1]["content"] == answer.content  # no gap, no duplicate
    row = RequestLog.objects.get(pk=request_id)
    assert row.status == RequestLog.Status.OK and row.finish_reason != "cancelled"  # resumed: it ran to its end
    assert row.response == text


def test_a_resume_after_the_last_delta_gets_only_the_end(stack, user):
    socket = chat_socket(stack, user)
    socket.send(json.dumps({**STORY, "max_new_tokens": 24}))
    received = until_done(socket)
    socket.close()
    request_id = next(m["request"] for m in received if m["type"] == "request")
    deltas = [m for m in received if m["type"] == "delta"]
    after = resume(stack, user, request_id, deltas[-1]["id"])
    assert [m["type"] for m in after] == ["done"]
    assert "".join(m["text"] for m in deltas) == after[-1]["content"] == received[-1]["content"]


def test_a_second_web_process_resumes_the_answer_and_a_stranger_cannot(stack, user, db_user_factory):
    web, url = start_web()
    try:
        socket = chat_socket(stack, user)
        turn, request_id, before = first_deltas(socket, 4)
        stranger = resume(_Url(url), db_user_factory(), request_id, "0")
        assert stranger[-1] == {"type": "error", "message": "No such answer to resume.", "param": "request"}
        socket.close()
        after = resume(_Url(url), user, request_id, before[-1]["id"])
    finally:
        web.stop()
    text = "".join(m["text"] for m in before + after if m["type"] == "delta")
    assert text == after[-1]["content"] == stored_answer(turn).content


def test_a_second_tab_sees_the_whole_answer_from_its_start(stack, user):
    socket = chat_socket(stack, user)
    turn, request_id, before = first_deltas(socket, 2)
    with concurrent.futures.ThreadPoolExecutor(1) as pool:  # both tabs read at once (each answers Daphne's pings)
        tab = pool.submit(resume, stack, user, request_id, "0")  # a second tab opened on the conversation
        rest = until_done(socket)
        second = tab.result()
    socket.close()
    first_text = "".join(m["text"] for m in before + rest if m["type"] == "delta")
    assert "".join(m["text"] for m in second if m["type"] == "delta") == first_text == rest[-1]["content"]


def test_an_unresumed_answer_is_cancelled_after_the_grace_period(stack, user):
    socket = chat_socket(stack, user)
    # a greedy answer that loops until max_new_tokens, so it outlasts the grace period (RESUME_GRACE_SECONDS)
    looping = dict(STORY, max_new_tokens=1000, prompt="Write a very long story about a lighthouse keeper")
    turn, request_id, _ = first_deltas(socket, 1, looping)
    socket.close()
    row = RequestLog.objects.get(pk=request_id)
    deadline = time.monotonic() + 120
    while row.status in (RequestLog.Status.QUEUED, RequestLog.Status.RUNNING) and time.monotonic() < deadline:
        time.sleep(0.2)
        row.refresh_from_db()
    assert row.status == RequestLog.Status.CANCELLED and row.completion_tokens < 1000
    assert stored_answer(turn).status == Message.Status.CANCELLED
    wait_until(lambda: value(scrape(stack.worker_metrics_url), "llmsite:num_requests_running", deployment="default") == 0, "the engine ran nothing")


def sse(url, headers) -> list[dict]:
    """The server-sent events of one GET: [{"id", "event", "data"}]."""
    response = requests.get(url, headers=headers, stream=True, timeout=120)
    assert response.status_code == 200, response.text
    assert response.headers["Content-Type"].startswith("text/event-stream")
    events, current = [], {}
    for line in response.iter_lines(decode_unicode=True):
        if not line:
            if current:
                events.append({**current, "data": json.loads(current["data"])})
            current = {}
            continue
        name, _, rest = line.partition(": ")
        current[name] = rest
    return events


def test_server_sent_events_of_a_request_honour_last_event_id(stack, token, user, db_user_factory):
    from chat.tokens import token_create

    answer = requests.post(
        stack.predict_url(), headers={"Authorization": token}, json={"prompt": "Name three colours.", "temperature": 0, "max_new_tokens": 24}, timeout=120
    )
    assert answer.status_code == 200, answer.text
    request_id = answer.headers["X-Request-Id"]
    assert RequestLog.objects.get(pk=request_id).user == user
    url = f"{stack.url}/api/requests/{request_id}/events"
    everything = sse(url, {"Authorization": f"Bearer {token}"})
    kinds = [e["event"] for e in everything if e["event"] != "queued"]  # its place in line first, if it waited
    assert kinds[0] == "start" and kinds[-1] == "final" and everything[-1]["event"] == "final"
    assert all(e["data"]["type"] == e["event"] and e["id"] for e in everything)
    text = "".join(e["data"]["text"] for e in everything if e["event"] == "delta")
    assert text == everything[-1]["data"]["text"] == answer.json()["response"]

    rest = sse(url, {"Authorization": token, "Last-Event-ID": everything[2]["id"]})
    assert rest == everything[3:]

    other = token_create(user=db_user_factory())[1]
    assert requests.get(url, headers={"Authorization": f"Bearer {other}"}, timeout=30).status_code == 404
    assert requests.get(url, timeout=30).status_code == 401
    bad = requests.get(url, headers={"Authorization": token, "Last-Event-ID": "x"}, timeout=30)
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "Last-Event-ID"


def test_every_predict_and_v1_response_names_its_request(stack, token):
    body = {"temperature": 0, "max_new_tokens": 4}
    streamed = requests.post(stack.predict_url(), headers={"Authorization": token}, json={**body, "prompt": "Hi", "use_stream_chat": True}, timeout=120)
    chat = {"model": "default", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4}
    v1 = [
        requests.post(f"{stack.url}/v1/chat/completions", headers={"Authorization": f"Bearer {token}"}, json={**chat, "stream": stream}, timeout=120)
        for stream in (False, True)
    ]
    ids = [r.headers["X-Request-Id"] for r in (streamed, *v1)]
    assert all(r.status_code == 200 for r in (streamed, *v1))
    assert v1[0].json()["id"].endswith(ids[1])
    assert RequestLog.objects.filter(pk__in=ids).count() == 3


def orphaned_answer(user, **request_fields) -> tuple[Message, RequestLog]:
    """An answer still marked streaming that its own socket will never store, as a web process
    stopped mid-answer (a restart) leaves it."""
    conversation = Conversation.objects.create(user=user, title="orphaned")
    request = RequestLog.objects.create(user=user, protocol="browser", **request_fields)
    Message.objects.create(conversation=conversation, role=Message.Role.USER, content="Where is the Louvre?")
    answer = Message.objects.create(
        conversation=conversation, role=Message.Role.ASSISTANT, status=Message.Status.STREAMING, request=request
    )
    return answer, request


@pytest.mark.parametrize("events_kept", [True, False], ids=["events-kept", "events-expired"])
def test_a_resume_stores_the_end_of_an_answer_its_own_socket_never_stored(stack, user, events_kept):
    """The page reloaded after such a restart resumes the answer and is shown its end; that end is
    stored then, so the conversation's next turns have it in their history (and the page no longer
    resumes it at each load): from the worker's events while they are kept, else from the row."""
    text = "The Louvre is in Paris."
    if events_kept:
        answer, request = orphaned_answer(user, status=RequestLog.Status.RUNNING)
        events.publish(str(request.pk), contract.Delta(text))  # as its worker published them
        events.publish(str(request.pk), contract.Final(text=text, finish_reason="stop", usage={"prompt_tokens": 5, "completion_tokens": 7}))
    else:
        answer, request = orphaned_answer(user, status=RequestLog.Status.OK, response=text)
    received = resume(stack, user, str(request.pk), "0")
    assert received[-1] == {"type": "done", "message_id": answer.pk, "status": "ok", "content": text, "error": ""}, received
    answer.refresh_from_db()
    assert answer.status == Message.Status.OK and answer.content == text
    assert _answered_pairs(list(answer.conversation.messages.order_by("pk"))) == [["Where is the Louvre?", text]]


def test_a_resumed_view_stores_nothing_over_what_the_answers_own_socket_stored(user):
    """The socket that started an answer has the last word (a stopped answer keeps what its page
    showed): the end a resumed view saw is stored only over an answer still marked streaming."""
    answer, _request = orphaned_answer(user, status=RequestLog.Status.RUNNING)
    Message.objects.filter(pk=answer.pk).update(status=Message.Status.CANCELLED, content="The Louvre")
    answer_settle(answer_id=answer.pk, content="The Louvre is in Paris.", status=Message.Status.OK)
    answer.refresh_from_db()
    assert answer.status == Message.Status.CANCELLED and answer.content == "The Louvre"
