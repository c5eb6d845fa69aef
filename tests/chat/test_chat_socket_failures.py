"""The chat socket and failures nothing in it expects (a bug, a service away): the page is told,
with the error's kind and not its text, instead of waiting for a reply that never comes; a turn
already stored ends as an error, and the socket goes on answering.

The failures are made by replacing one of the site's own functions with one that raises; the
consumer runs in this process (Channels' communicator) against the suite's PostgreSQL, Redis
and worker.
"""

import asyncio

from channels.testing import WebsocketCommunicator

from chat import chat_consumer, conversations, events, in_flight, resume
from chat.chat_consumer import ChatConsumer
from chat.models import Message, RequestLog
from llmsite import contract
from tests.chat.test_resume import orphaned_answer


def broken(**kwargs):
    raise RuntimeError("secret detail of a bug")


async def connected(user) -> WebsocketCommunicator:
    communicator = WebsocketCommunicator(ChatConsumer.as_asgi(), "/ws/chat/")
    communicator.scope["user"] = user
    accepted, _ = await communicator.connect()
    assert accepted
    return communicator


async def talk(user, messages: list[dict], *, until: int) -> list[dict]:
    """Send `messages` over one chat socket of `user`; the replies until `until` of them ended
    in a "done" or an "error"."""
    communicator = await connected(user)
    received, ended = [], 0
    try:
        for message in messages:
            await communicator.send_json_to(message)
        while ended < until:
            received.append(await communicator.receive_json_from(timeout=60))
            ended += received[-1]["type"] in ("done", "error")
    finally:
        await communicator.disconnect()
    return received


def test_a_failure_before_the_turn_is_stored_is_told_to_the_page(user, monkeypatch):
    monkeypatch.setattr(conversations, "turn_start", broken)
    received = asyncio.run(talk(user, [{"type": "send", "deployment": "default", "prompt": "hi"}, {"type": "nope"}], until=2))
    unknown, failed = sorted(received, key=lambda m: m.get("param") != "type")
    assert unknown["param"] == "type", received  # the socket went on answering
    assert failed["type"] == "error" and failed["code"] == "server_error", received
    assert "RuntimeError" in failed["message"] and "secret" not in failed["message"], failed


def test_a_failure_after_the_turn_is_stored_ends_it_as_an_error_and_lets_its_request_go(stack, user, monkeypatch):
    monkeypatch.setattr(conversations, "answer_link", broken)
    closed, close = [], in_flight.Generation.close

    async def noted_close(generation):
        closed.append(generation.request_id)
        await close(generation)

    monkeypatch.setattr(in_flight.Generation, "close", noted_close)
    send = {"type": "send", "deployment": "default", "prompt": "Say hi.", "temperature": 0, "max_new_tokens": 4}
    received = asyncio.run(talk(user, [send], until=1))
    assert [m["type"] for m in received] == ["turn", "usage", "done"], received
    done = received[-1]
    assert done["status"] == "error" and "RuntimeError" in done["error"] and "secret" not in done["error"], done
    answer = Message.objects.get(pk=received[0]["answer"]["id"])
    assert answer.status == Message.Status.ERROR and answer.error == done["error"]
    assert len(closed) == 1, "the request's listener (and its slot) was let go"


def test_a_resume_that_fails_is_told_to_the_page(user, monkeypatch):
    monkeypatch.setattr(resume, "answer_of", broken)
    received = asyncio.run(talk(user, [{"type": "resume", "request": "00000000-0000-0000-0000-000000000000"}], until=1))
    assert received[-1]["type"] == "error" and received[-1]["code"] == "server_error", received


def test_a_stopped_resume_the_worker_never_confirms_still_ends(user, monkeypatch):
    """Stop on a resumed answer whose worker never answers (here: none was ever given it): after
    the stop's grace period the page gets the end, marked cancelled."""
    monkeypatch.setattr(chat_consumer, "STOP_GRACE_SECONDS", 0.5)
    _answer, request = orphaned_answer(user, status=RequestLog.Status.RUNNING)
    events.publish(str(request.pk), contract.Delta("Once upon a time"))

    async def resume_then_stop():
        communicator = await connected(user)
        try:
            await communicator.send_json_to({"type": "resume", "request": str(request.pk)})
            shown = await communicator.receive_json_from(timeout=60)
            assert shown["type"] == "delta", shown  # the view follows the answer: Stop reaches it
            await communicator.send_json_to({"type": "stop"})
            return await communicator.receive_json_from(timeout=60)
        finally:
            await communicator.disconnect()

    done = asyncio.run(resume_then_stop())
    assert done["type"] == "done" and done["status"] == "cancelled" and done["content"] == "Once upon a time", done
    answer = Message.objects.get(request=request)  # its own socket is gone: the view stored what it showed
    assert answer.status == Message.Status.CANCELLED and answer.content == "Once upon a time"


def test_a_stop_that_fails_is_told_and_the_answer_still_ends(stack, user, monkeypatch):
    """Stop while the worker cannot be told (Redis away; made here by a cancel that raises): the
    page is told, naming Stop, goes on following the answer, and gets its end after the stop's
    grace period: what it showed, marked cancelled."""
    monkeypatch.setattr(chat_consumer, "STOP_GRACE_SECONDS", 0.5)

    async def broken_cancel(generation):
        raise RuntimeError("secret detail of a bug")

    monkeypatch.setattr(in_flight.Generation, "cancel", broken_cancel)
    story = {"type": "send", "deployment": "default", "prompt": "Tell me a long story about a dragon.", "temperature": 0, "max_new_tokens": 400}

    async def send_then_stop():
        communicator = await connected(user)
        try:
            await communicator.send_json_to(story)
            received = []
            while not any(m["type"] == "delta" for m in received):
                received.append(await communicator.receive_json_from(timeout=120))
            await communicator.send_json_to({"type": "stop"})
            while received[-1]["type"] != "done":
                received.append(await communicator.receive_json_from(timeout=60))
            return received
        finally:
            await communicator.disconnect()

    received = asyncio.run(send_then_stop())
    refused = next(m for m in received if m["type"] == "error")
    assert refused["param"] == "stop" and "RuntimeError" in refused["message"] and "secret" not in refused["message"], refused
    done = received[-1]
    assert done["status"] == "cancelled", done
    assert done["content"] == "".join(m["text"] for m in received if m["type"] == "delta")
