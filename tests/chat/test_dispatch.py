"""What the web tier does on the way to the first token: few database round trips, and a line
entry that carries what the worker needs."""

import json
import uuid

import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext

from chat import services
from llmsite.errors import Forbidden
from chat.events import sync_client
from chat.generation import Conversation
from llmsite import admission
from llmsite.contract import SamplingParams
from chat.models import Deployment
from chat.tokens import token_create
from workers import loader
from workers.services import _prompt_target


@pytest.fixture
def deployment():
    return Deployment.objects.create(
        name=f"dispatch-{uuid.uuid4().hex[:8]}",
        model_source="x/y",
        queue=f"nobody-{uuid.uuid4().hex[:8]}",  # no worker: the message stays in Redis to be read
        model_type="qwen",
        chat_template="{{ messages[0]['content'] }}",
        context_length=512,
    )


def test_a_deployment_and_the_tokens_scope_are_one_query(user, deployment):
    other = Deployment.objects.create(name=f"other-{uuid.uuid4().hex[:8]}", model_source="x/y")
    scoped, _ = token_create(user=user, deployments=[deployment])
    anywhere, _ = token_create(user=user)
    for token in (scoped, anywhere):
        with CaptureQueriesContext(connection) as queries:
            assert services.access_deployment(token=token, name=deployment.name).pk == deployment.pk
        assert len(queries) == 1, [q["sql"] for q in queries]
    assert services.access_deployment(token=anywhere, name=other.name).pk == other.pk
    with pytest.raises(Forbidden):
        services.access_deployment(token=scoped, name=other.name)


def test_the_line_carries_the_prompt_format_and_the_request_and_no_celery_message_is_sent(user, deployment):
    """Generation waits in the deployment's fair line in Redis (llmsite/admission.py), not as a
    Celery message: the line holds the request as the worker will read it."""
    token, _ = token_create(user=user)
    secret = f"my private question {uuid.uuid4().hex}"
    prepared = services.Prepared(deployment, token, Conversation(prompt=secret), SamplingParams(max_new_tokens=8, temperature=0, top_k=0, top_p=1.0, do_sample=False), "http", user=user)
    request_id = str(uuid.uuid4())
    services._enqueue(prepared, request_id)
    try:
        raw = sync_client().hget(f"{admission.prefix(deployment.name)}:body", request_id)
        assert sync_client().llen(deployment.queue) == 0
    finally:
        admission.done(deployment=deployment.name, request_id=request_id)
    assert sync_client().hget(f"{admission.prefix(deployment.name)}:body", request_id) is None
    kwargs = json.loads(raw)
    assert kwargs["request_id"] == request_id
    assert kwargs["prompt_format"] == {"model_type": "qwen", "chat_template": "{{ messages[0]['content'] }}", "context_length": 512}
    assert kwargs["messages"][-1]["content"] == secret


def test_the_worker_takes_the_prompt_format_from_the_task_when_its_engine_is_loaded(deployment, monkeypatch):
    sent = {"model_type": "llama2", "chat_template": "", "context_length": None}
    monkeypatch.setitem(loader.ENGINES, deployment.name, object())
    with CaptureQueriesContext(connection) as queries:
        target = _prompt_target(deployment.name, sent)
    assert len(queries) == 0
    assert (target.name, target.model_type, target.chat_template, target.context_length) == (deployment.name, "llama2", "", None)
    # a task from before this field existed, or for an engine not loaded yet: the row
    assert _prompt_target(deployment.name, None).chat_template == deployment.chat_template
    monkeypatch.delitem(loader.ENGINES, deployment.name)
    assert _prompt_target(deployment.name, sent).model_type == "qwen"
