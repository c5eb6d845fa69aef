"""The chat page's WebSocket as the browser uses it (session cookie, Origin), without a browser.

History comes from the stored messages, trimmed to the model's context with the oldest turns
dropped first; bad input is refused with the field named and nothing stored.
"""

import json
import time
import uuid

import pytest
import websocket
from django.test import Client

from chat.conversations import answer_reserve, trim_history
from chat.generation import Conversation as Prompt
from chat.models import Conversation, Deployment, Message, RequestLog
from chat.prompting import count_tokens, edge_tokenizer, render_prompt
from tests.chat import clients


def chat_socket(stack, user=None):
    cookie = ""
    if user is not None:
        client = Client()
        client.force_login(user)
        cookie = f"sessionid={client.cookies['sessionid'].value}"
    return websocket.create_connection(
        f"{stack.ws_url}/ws/chat/", origin=stack.url, cookie=cookie, timeout=300
    )


def until_done(socket) -> list[dict]:
    received, until = [], time.monotonic() + 300
    while not received or received[-1]["type"] not in ("done", "error"):
        received.append(clients.receive_json(socket, until=until))
    return received


def stored_conversation(user, turns):
    conversation = Conversation.objects.create(user=user, title=f"long {uuid.uuid4().hex[:6]}")
    for question, answer in turns:
        Message.objects.create(conversation=conversation, role="user", content=question)
        Message.objects.create(conversation=conversation, role="assistant", content=answer)
    return conversation


TURNS = [(f"Question {n}: tell me about the number {n} in a few words.", f"Answer {n}: {n} is a number. " * 3) for n in range(30)]


def test_anonymous_socket_is_refused(stack):
    with pytest.raises(websocket.WebSocketException):
        socket = chat_socket(stack)
        clients.receive(socket)


def test_bad_sampling_value_is_refused_with_the_field_named_and_nothing_stored(stack, user):
    socket = chat_socket(stack, user)
    try:
        socket.send(json.dumps({"type": "send", "deployment": "default", "prompt": "hi", "temperature": 5}))
        reply = clients.receive_json(socket)
        assert reply["type"] == "error" and reply["param"] == "temperature"
        assert "less than or equal to 2" in reply["message"]
        socket.send(json.dumps({"type": "send", "deployment": "nope", "prompt": "hi"}))
        reply = clients.receive_json(socket)
        assert reply["type"] == "error" and "nope" in reply["message"]
        socket.send(json.dumps({"type": "send", "deployment": 5, "prompt": "hi"}))  # not a string
        reply = clients.receive_json(socket)
        assert reply["type"] == "error" and "'5'" in reply["message"], reply
        socket.send("not json")
        assert clients.receive_json(socket)["param"] == "body"
    finally:
        socket.close()
    assert not Conversation.objects.filter(user=user).exists()


def test_history_from_stored_messages_is_trimmed_oldest_first(stack, user):
    conversation = stored_conversation(user, TURNS)
    deployment = Deployment.objects.get(name="default")
    Deployment.objects.filter(pk=deployment.pk).update(context_length=256)
    socket = chat_socket(stack, user)
    try:
        socket.send(json.dumps({
            "type": "send", "conversation": str(conversation.pk), "deployment": "default",
            "prompt": "What is 1 + 1?", "max_new_tokens": 4,
        }))
        received = until_done(socket)
    finally:
        socket.close()
        Deployment.objects.filter(pk=deployment.pk).update(context_length=deployment.context_length)

    assert received[0]["type"] == "turn" and received[-1]["status"] == "ok", received
    answer = Message.objects.get(pk=received[-1]["message_id"])
    request = answer.request
    kept = request.history
    assert 0 < len(kept) < len(TURNS)
    assert kept == [list(pair) for pair in TURNS[-len(kept):]]  # the newest turns, in order
    assert request.prompt_tokens + 4 <= 256
    assert request.status == RequestLog.Status.OK


def test_trim_keeps_the_most_recent_turns_that_fit(stack):
    deployment = Deployment.objects.get(name="default")  # its tokenizer, as the worker published it
    tokenizer = edge_tokenizer(deployment.tokenizer_files)
    small = Deployment(name="small", context_length=400, tokenizer_files=deployment.tokenizer_files)
    prompt = Prompt(prompt="And now?", system_prompt="Be brief.", history=[list(t) for t in TURNS])

    trimmed = trim_history(deployment=small, prompt=prompt, max_new_tokens=50)

    def tokens(p):
        return count_tokens(tokenizer, render_prompt(tokenizer, p.messages()))

    budget = 400 - answer_reserve(context=400, max_new_tokens=50)
    kept = len(trimmed.history)
    assert 0 < kept < len(TURNS) and trimmed.history == prompt.history[-kept:]
    assert tokens(trimmed) <= budget
    assert tokens(Prompt(prompt.prompt, prompt.system_prompt, prompt.history[-kept - 1:])) > budget
    assert trimmed.system_prompt == "Be brief." and trimmed.prompt == "And now?"
    # A context with room for everything keeps everything.
    roomy = Deployment(name="roomy", context_length=8192, tokenizer_files=deployment.tokenizer_files)
    assert trim_history(deployment=roomy, prompt=prompt, max_new_tokens=50).history == prompt.history


def test_a_message_too_long_for_the_context_is_refused_and_nothing_is_stored(stack, user):
    deployment = Deployment.objects.get(name="default")
    Deployment.objects.filter(pk=deployment.pk).update(context_length=64)
    socket = chat_socket(stack, user)
    try:
        socket.send(json.dumps({"type": "send", "deployment": "default", "prompt": "word " * 200}))
        reply = clients.receive_json(socket)
    finally:
        socket.close()
        Deployment.objects.filter(pk=deployment.pk).update(context_length=deployment.context_length)
    assert reply["type"] == "error" and reply["param"] == "prompt"
    assert "the model's context is 64 tokens" in reply["message"]
    assert not Conversation.objects.filter(user=user).exists()


def test_an_answer_whose_page_closed_is_stopped_and_stored_as_cancelled(stack, user):
    socket = chat_socket(stack, user)
    socket.send(json.dumps({
        "type": "send", "deployment": "default", "max_new_tokens": 300,
        "prompt": "Write a very long story about a lighthouse keeper.",
    }))
    turn = clients.receive_json(socket)
    until = time.monotonic() + 300
    while clients.receive_json(socket, until=until)["type"] != "delta":
        pass
    socket.close()  # the tab went away mid-answer

    answer = Message.objects.get(pk=turn["answer"]["id"])
    deadline = time.monotonic() + 120  # bounds the wait; no speed is asserted
    while answer.status == Message.Status.STREAMING and time.monotonic() < deadline:
        time.sleep(0.5)
        answer.refresh_from_db()
    assert answer.status == Message.Status.CANCELLED and answer.content
    request = RequestLog.objects.get(pk=answer.request_id)
    deadline = time.monotonic() + 120
    while request.status == RequestLog.Status.RUNNING and time.monotonic() < deadline:
        time.sleep(0.5)
        request.refresh_from_db()
    assert request.status == RequestLog.Status.CANCELLED and request.completion_tokens < 300
