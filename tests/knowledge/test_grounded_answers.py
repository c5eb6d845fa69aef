"""Acceptance 1: a .txt, .md, .docx and .pdf built here, each with a made-up fact, are ingested; each
fact asked with `langchain: true` at temperature 0 is answered from its file, whose name heads the
sources (non-streamed body, first streamed object, WebSocket with return_sources)."""

import json
import uuid

import pytest
import requests

from chat.models import Deployment
from tests.chat.test_predict_websocket import EOS, answers, run_client
from tests.knowledge.conftest import docx_file, md_file, pdf_file, txt_file, upload, wait_done

# (file name, builder, question, the fact's answer) — facts no model knows, phrased so that even a
# small model can copy the answer from the context.
FACTS = [
    (
        "zorblax.txt",
        lambda: txt_file(
            "The Zorblax project studies glowing moss that grows in deep caves.",
            "The secret code of the Zorblax project is 7391.",
            "Its team meets on Mondays in a wooden hut near the river.",
        ),
        "What is the secret code of the Zorblax project?",
        "7391",
    ),
    (
        "quimby-bank.md",
        lambda: md_file(
            "Quimby Bank",
            "Quimby Bank keeps gold for the farmers of the valley.",
            "The vault number of the Quimby Bank is 4826.",
        ),
        "What is the vault number of the Quimby Bank?",
        "4826",
    ),
    (
        "trellow-rocket.docx",
        lambda: docx_file(
            "Trellow rocket",
            "The Trellow rocket is painted green and carries weather sensors.",
            "The launch year of the Trellow rocket is 2093.",
        ),
        "What is the launch year of the Trellow rocket?",
        "2093",
    ),
    (
        "plonkit-archive.pdf",
        lambda: pdf_file(
            "The Plonkit archive stores old maps of the northern islands.",
            "The room number of the Plonkit archive is 5519.",
        ),
        "What is the room number of the Plonkit archive?",
        "5519",
    ),
]


@pytest.fixture(scope="module")
def library(stack, django_db_blocker):
    """One knowledge base holding the four files, its owner's token and its name."""
    from django.contrib.auth import get_user_model

    from chat.tokens import token_create
    from knowledge.models import KnowledgeBase

    with django_db_blocker.unblock():
        owner = get_user_model().objects.create_user(f"kb-owner-{uuid.uuid4().hex[:8]}")
        token = token_create(user=owner)[1]
        kb = KnowledgeBase.objects.create(name=f"facts-{uuid.uuid4().hex[:8]}", owner=owner)
    ids = {}
    for name, build, _, _ in FACTS:
        response = upload(stack.url, token, kb.name, name, build())
        assert response.status_code == 202, response.text
        ids[name] = response.json()["id"]
    for name, document_id in ids.items():
        done = wait_done(stack.url, token, kb.name, document_id)
        assert done["status"] == "ready", done
    return token, kb


def ask(question, kb_name=None, **extra):
    body = {"prompt": question, "temperature": 0, "max_new_tokens": 32, "langchain": True, **extra}
    if kb_name:
        body["knowledge_base"] = kb_name
    return body


@pytest.mark.parametrize("name,question,answer", [(n, q, a) for n, _, q, a in FACTS], ids=[f[0] for f in FACTS])
def test_each_fact_is_answered_from_its_file(stack, library, name, question, answer):
    token, kb = library
    response = requests.post(stack.predict_url(), headers={"Authorization": token}, json=ask(question, kb.name), timeout=180)
    assert response.status_code == 200, response.text
    data = json.loads(response.content)
    assert answer in data["response"]
    assert data["sources"], "a grounded answer names its sources"
    top = data["sources"][0]
    assert top["document"] == name
    assert any(answer in s["text"] and s["document"] == name for s in data["sources"])
    assert isinstance(top["chunk"], int) and isinstance(top["score"], float)
    scores = [s["score"] for s in data["sources"]]
    assert scores == sorted(scores, reverse=True), "sources are best first"


def test_streamed_answer_carries_the_sources_in_its_first_object(stack, library):
    token, kb = library
    _, _, question, answer = FACTS[0]
    response = requests.post(
        stack.predict_url(),
        headers={"Authorization": token},
        json=ask(question, kb.name, use_stream_chat=True),
        stream=True,
        timeout=180,
    )
    assert response.status_code == 200
    objects = [
        json.loads(chunk.decode("utf-8"))
        for chunk in response.iter_lines(chunk_size=8192, decode_unicode=False, delimiter=b"\0")
        if chunk
    ]
    assert objects and "error" not in objects[-1], objects[-1:]
    assert objects[0]["sources"][0]["document"] == FACTS[0][0]
    assert all("sources" not in o for o in objects[1:])
    assert answer in objects[-1]["response"]


def test_websocket_sends_sources_only_to_a_request_that_asks(stack, library):
    token, kb = library
    _, _, question, answer = FACTS[1]
    received = run_client(
        stack.predict_ws_url(), token, [ask(question, kb.name, return_sources=True), ask(question, kb.name)]
    )
    assert received.count(EOS) == 2
    with_sources, without = answers(received)
    first = json.loads(with_sources[0])
    assert list(first) == ["sources"] and first["sources"][0]["document"] == FACTS[1][0]
    assert answer in "".join(with_sources[1:])
    assert answer in "".join(without) and "sources" not in "".join(without)


def test_deployment_default_knowledge_base_is_used_when_none_is_named(stack, library):
    token, kb = library
    _, _, question, answer = FACTS[3]
    Deployment.objects.filter(name="default").update(default_knowledge_base=kb)
    try:
        response = requests.post(stack.predict_url(), headers={"Authorization": token}, json=ask(question), timeout=180)
    finally:
        Deployment.objects.filter(name="default").update(default_knowledge_base=None)
    assert response.status_code == 200, response.text
    data = response.json()
    assert data["sources"][0]["document"] == FACTS[3][0]
    assert answer in data["response"]
