"""Waiting on the chat page: while an answer waits for its turn the page shows "Waiting: N ahead of
you" in place of it (issue 22), and while its worker loads the model "Loading the model on <worker>…
(N s)"; the answer replaces it when it starts."""

import json
import re
import uuid

import websocket
from playwright.sync_api import expect

from chat import events
from chat.models import Deployment, RequestLog
from chat.tokens import token_create
from llmsite.launcher import worker_command
from tests.chat import clients
from tests.chat.test_fairness import fair_deployment, open_streams, rows, wait_until
from tests.conftest import Process
from tests.site.conftest import ANSWER_TIMEOUT_MS, ask, last_answer, make_user, wait_answered
from tests.tiny_models import always_emitting, build_tiny_model, default_tokenizer_files


def test_a_waiting_answer_shows_its_place_in_line_until_it_starts(page, chat_user, stack):
    deployment = fair_deployment("default", max_batch_size=1)
    ahead = []
    try:
        for _ in range(3):  # one runs, two of other users wait ahead of the page's answer
            someone, _password = make_user()
            ahead += open_streams(stack, token_create(user=someone)[1], deployment.name, 1)
            wait_until(lambda: rows(someone, deployment.name).exists(), "its row")
        page.reload()
        page.get_by_label("Deployment").select_option(deployment.name)
        ask(page, "What is the capital of France?", Temperature=0, **{"Max new tokens": 8})
        expect(last_answer(page)).to_have_text(re.compile(r"^Waiting: 2 ahead of you( \(about \d+ s\))?$"), timeout=ANSWER_TIMEOUT_MS)
        for socket in ahead:
            socket.close()  # the line moves: the answer starts and replaces the waiting text
        text = wait_answered(page)
        assert "Waiting" not in text and "Paris" in text
        assert not page.script_errors
    finally:
        for socket in ahead:
            socket.close()


def test_an_answer_whose_worker_loads_the_model_shows_the_load_until_it_starts(page, chat_user, stack, tmp_path):
    """A worker of its own (WORKER_RELOAD_MODE "replace") serves a tiny model that answers " Paris"
    for as long as asked; while an answer on it runs, its deployment is switched to another model:
    the worker's old engine waits for that answer before the new model loads, and the page's answer,
    which waits for that load, shows "Loading the model on <worker>… (N s)" in place of it until it
    starts, once the test has stopped the answer on the old engine."""
    files = default_tokenizer_files()
    long_answers = always_emitting(build_tiny_model(tmp_path / "long", "llama", files, max_position_embeddings=32768), " Paris")
    short_answers = always_emitting(build_tiny_model(tmp_path / "short", "llama", files), " Paris")
    name = f"loading-{uuid.uuid4().hex[:6]}"
    deployment = Deployment.objects.create(name=name, queue=name, model_source=str(long_answers), model_type="llama2")
    env = {"WORKER_RELOAD_INTERVAL": "0.5", "WORKER_RELOAD_MODE": "replace"}
    worker = Process(f"worker-{name}", worker_command([name], hostname=f"{name}@%h"), env).start()
    holding = None
    try:
        wait_until(lambda: Deployment.objects.get(pk=deployment.pk).status == Deployment.Status.READY, "the worker's load")
        holding = websocket.create_connection(stack.predict_ws_url(name), header=[f"Authorization: {token_create(user=chat_user)[1]}"])
        holding.send(json.dumps({"prompt": "Tell me a story.", "temperature": 0, "max_new_tokens": 30000}))
        first = clients.receive(holding)  # the answer that keeps the old engine open runs
        assert " Paris".startswith(first) or first.startswith(" Paris"), first
        deployment.model_source = str(short_answers)
        deployment.save()  # as the admin's change form does
        wait_until(lambda: "once the answers on the old one have ended" in Deployment.objects.get(pk=deployment.pk).status_detail, "the reload")
        page.reload()
        page.get_by_label("Deployment").select_option(name)
        ask(page, "Where is the Louvre?", Temperature=0, **{"Max new tokens": 4})
        expect(last_answer(page)).to_have_text(re.compile(rf"^Loading the model on {name}@\S+… \(\d+ s\)$"), timeout=ANSWER_TIMEOUT_MS)
        held = RequestLog.objects.get(deployment=deployment, protocol="websocket")
        events.sync_client().set(events.cancel_key(held.id), b"1", ex=60)  # stopped, as the web tier's Stop does
        # the old engine closes once that answer has ended, then the new model loads
        text = wait_answered(page)
        assert "Loading" not in text and "Paris" in text, text
        assert RequestLog.objects.get(pk=held.pk).status == RequestLog.Status.CANCELLED
        assert not page.script_errors
        assert worker.alive(), worker.log_tail()
    finally:
        if holding is not None:
            holding.close()
        worker.stop()
        Deployment.objects.filter(pk=deployment.pk).update(enabled=False)
