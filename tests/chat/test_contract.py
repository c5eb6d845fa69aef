"""The contract between the tiers (llmsite.contract): the request a worker is sent, the typed
events that come back, and the request row's state machine (chat.lifecycle)."""

import json
import logging
import time
import uuid

import pytest

from chat import events, lifecycle
from chat.models import Deployment, RequestLog
from llmsite import contract, producer
from llmsite.contract import ContractError, GenerationRequest, SamplingParams


def a_request(**changes) -> dict:
    request = GenerationRequest(
        request_id=str(uuid.uuid4()),
        deployment="default",
        messages=[{"role": "user", "content": "What is the capital of France?"}],
        sampling=SamplingParams(max_new_tokens=4, temperature=0, top_k=0, top_p=1.0, do_sample=False),
    )
    return {**request.to_wire(), **changes}


@pytest.mark.parametrize(
    "event",
    [
        contract.Received(worker="w1"),
        contract.Received(worker="w1", loading_seconds=12.5),
        contract.Start(worker="w1"),
        contract.Sources([{"document": "a.md", "chunk": 0, "score": 0.5, "text": "x"}]),
        contract.Delta("Pa"),
        contract.Final("Paris", "stop", {"prompt_tokens": 3, "completion_tokens": 2}, cached_tokens=1),
        contract.Embeddings([[0.1, 0.2]], 4),
        contract.Error("no room", kind="invalid_request", param="prompt"),
    ],
)
def test_every_event_goes_through_the_wire_unchanged(event):
    assert contract.decode(contract.encode(event)) == event


def test_an_event_that_breaks_the_contract_is_named():
    with pytest.raises(ContractError, match="unknown type"):
        contract.decode(json.dumps({"type": "telepathy"}))
    with pytest.raises(ContractError, match="delta event"):
        contract.decode(json.dumps({"type": "delta"}))


def test_a_received_event_of_a_worker_that_does_not_say_how_long_it_waited_tells_of_no_load():
    """An older worker's `received` (no `loading_seconds`): the web tier watches that worker and
    shows nothing; a newer worker's field the web tier does not know is left out."""
    assert contract.decode(json.dumps({"type": "received", "worker": "w1"})).loading_seconds is None
    assert contract.decode(json.dumps({"type": "received", "worker": "w1", "later": 1})) == contract.Received(worker="w1")
    with pytest.raises(ContractError, match="loading_seconds"):
        contract.decode(json.dumps({"type": "received", "loading_seconds": "soon"}))


def test_a_request_from_a_newer_web_tier_is_answered_without_its_new_fields(caplog):
    wire = a_request(speculative_tokens=4)
    with caplog.at_level(logging.WARNING, logger="llmsite.contract"):
        request = GenerationRequest.from_wire(wire)
    assert request.request_id == wire["request_id"] and request.sampling.max_new_tokens == 4
    assert "speculative_tokens" in caplog.text


@pytest.mark.parametrize(
    "changes, named",
    [
        ({"messages": "hello"}, "messages"),
        ({"sampling": {"temperature": 0}}, "sampling"),
        ({"prompt_ids": ["a"]}, "prompt_ids"),
        ({"version": contract.PROTOCOL_VERSION + 1}, "version"),
        ({"sent_at": "yesterday"}, "sent_at"),
    ],
)
def test_a_request_that_breaks_the_contract_names_the_field(changes, named):
    with pytest.raises(ContractError, match=named):
        GenerationRequest.from_wire(a_request(**changes))
    wire = a_request()
    del wire["deployment"]
    with pytest.raises(ContractError, match="deployment: missing"):
        GenerationRequest.from_wire(wire)


def test_the_worker_answers_a_request_missing_a_field_with_an_error_event(stack, user):
    """Sent straight to the real worker's queue: an error event on the stream and the row failed,
    and the worker goes on answering."""
    wire = a_request()
    del wire["sampling"]
    request_id = wire["request_id"]
    lifecycle.record(
        request_id=request_id, user=user, token=None, deployment=Deployment.objects.get(name="default"),
        protocol="http", prompt="x", system_prompt="", history=[], params={},
    )
    producer.send(producer.GENERATE_TASK, task_id=request_id, queue="default", kwargs=wire)
    heard, last = [], "0"
    deadline = time.monotonic() + 60
    while not any(isinstance(e, contract.TERMINAL) for e in heard):
        assert time.monotonic() < deadline, f"no end heard: {heard}"
        for _, entries in events.sync_client().xread({events.channel(request_id): last}, block=1000) or []:
            for last, fields in entries:
                heard.append(contract.decode(fields[b"e"]))
    assert isinstance(heard[-1], contract.Error) and "sampling: missing" in heard[-1].message
    assert RequestLog.objects.get(id=request_id).status == RequestLog.Status.ERROR


def test_a_transition_the_state_does_not_allow_is_refused_and_logged(user, caplog):
    request_id = str(uuid.uuid4())
    lifecycle.record(
        request_id=request_id, user=user, token=None, deployment=None, protocol="http", prompt="x", system_prompt="",
        history=[], params={},
    )
    assert lifecycle.start(request_id, worker="w1")
    with caplog.at_level(logging.WARNING, logger="chat.lifecycle"):
        assert not lifecycle.start(request_id, worker="w2")  # a second delivery of the task
    assert "running -> running refused" in caplog.text
    assert lifecycle.fail(request_id, "the stream went silent")
    assert not lifecycle.finish(
        request_id, response="late", finish_reason="stop", prompt_tokens=1, completion_tokens=1, cached_tokens=0, first_token_at=None
    )
    row = RequestLog.objects.get(id=request_id)
    assert (row.status, row.worker, row.response) == (RequestLog.Status.ERROR, "w1", "")


def test_the_worker_generates_from_the_ids_the_web_tier_counted(stack, token):
    """The web tier's count is the one the worker uses: its tokenizer files are the worker's."""
    import requests

    question = f"What is the capital of France? ({uuid.uuid4().hex[:6]})"
    answer = requests.post(stack.predict_url(), headers={"Authorization": token}, json={"prompt": question, "max_new_tokens": 2}, timeout=120)
    assert answer.status_code == 200, answer.text
    row = RequestLog.objects.get(prompt=question)
    assert row.status == RequestLog.Status.OK and row.prompt_tokens > 0
    assert f"generation {row.id} refits" not in stack.worker.log_path.read_text(errors="replace")
