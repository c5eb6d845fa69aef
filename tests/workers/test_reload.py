"""A deployment changed in the admin after its worker loaded it (workers/reload.py): a new model is
loaded and answers without restarting the worker, a failed one is tried again once corrected, a
disabled one's engine is closed; and a replaced engine finishes the requests already on it."""

import threading
import time
import uuid

import pytest
import requests

from chat.models import Deployment
from llmsite.contract import SamplingParams
from llmsite.launcher import worker_command
from tests.conftest import Process, wait_for_log
from tests.tiny_models import always_emitting, build_tiny_model, default_tokenizer_files
from workers import loader, reload
from workers.engines.base import GenerationResult
from workers.engines.scheduling import BatchRequest

DEADLINE = 300  # a bound on polling, not a speed check


@pytest.fixture(scope="module")
def folders(stack, tmp_path_factory, django_db_blocker):
    """Two tiny Llamas: one of random weights, and one that always answers "Paris"."""
    root = tmp_path_factory.mktemp("reload")
    with django_db_blocker.unblock():
        files = default_tokenizer_files()
    random = build_tiny_model(root / "random", "llama", files)
    paris = always_emitting(build_tiny_model(root / "paris", "llama", files), " Paris")
    return {"random": str(random), "paris": str(paris)}


def _ask(stack, token, name) -> requests.Response:
    return requests.post(
        stack.predict_url(name), headers={"Authorization": token},
        json={"prompt": "Where is the Louvre?", "temperature": 0, "max_new_tokens": 4}, timeout=120,
    )


def _wait_status(name: str, status: str, after) -> Deployment:
    deadline = time.monotonic() + DEADLINE
    while True:
        deployment = Deployment.objects.get(name=name)
        if deployment.status == status and deployment.status_updated_at > after:
            return deployment
        assert time.monotonic() < deadline, (deployment.status, deployment.status_detail)
        time.sleep(0.2)


def test_a_changed_failed_or_disabled_deployment_reaches_its_running_worker(stack, token, folders):
    prefix = f"reload-{uuid.uuid4().hex[:6]}"
    main = Deployment.objects.create(name=f"{prefix}-main", model_source=folders["random"], model_type="llama2")
    broken = Deployment.objects.create(name=f"{prefix}-broken", model_source=folders["random"] + "-missing", model_type="llama2")
    worker = Process(
        f"worker-{prefix}", worker_command([main.name, broken.name], hostname=f"{prefix}@%h"), {"WORKER_RELOAD_INTERVAL": "0.5"}
    ).start()
    try:
        _wait_status(main.name, Deployment.Status.READY, _epoch())
        _wait_status(broken.name, Deployment.Status.FAILED, _epoch())
        assert "Paris" not in _ask(stack, token, main.name).json()["response"]

        changed_at = Deployment.objects.get(name=main.name).status_updated_at
        main.model_source = folders["paris"]
        main.save()  # as the admin's change form does
        _wait_status(main.name, Deployment.Status.READY, changed_at)
        answer = _ask(stack, token, main.name)
        assert answer.status_code == 200 and answer.json()["response"].startswith(" Paris Paris"), answer.text
        wait_for_log(worker, "a replaced or dropped engine closed", timeout=DEADLINE)

        failed_at = Deployment.objects.get(name=broken.name).status_updated_at
        broken.model_source = folders["paris"]
        broken.save()
        _wait_status(broken.name, Deployment.Status.READY, failed_at)
        assert _ask(stack, token, broken.name).json()["response"].startswith(" Paris"), "the corrected one is loaded again"

        Deployment.objects.filter(name=main.name).update(enabled=False)
        wait_for_log(worker, f"deployment {main.name} disabled or deleted: its engine goes", timeout=DEADLINE)
        assert _ask(stack, token, broken.name).status_code == 200, "the engine the two shared stays with the other"
        assert worker.alive(), worker.log_tail()
    finally:
        worker.stop()
        Deployment.objects.filter(name__startswith=prefix).update(enabled=False)


def _epoch():
    from datetime import datetime, timezone

    return datetime(1970, 1, 1, tzinfo=timezone.utc)


def _engine(kind: str, folders):
    """A transformers engine of the tiny model that always answers " Paris" (never an end of text
    before its length), or a llama.cpp engine of the default model."""
    if kind == "transformers":
        from workers.engines.transformers_engine import TransformersEngine

        return TransformersEngine(Deployment(name=f"reload-{uuid.uuid4().hex[:6]}", model_source=folders["paris"], model_type="llama2"))
    from workers.engines.llamacpp.engine import LlamaCppEngine

    default = Deployment.objects.get(name="default")
    return LlamaCppEngine(Deployment(name=f"reload-{uuid.uuid4().hex[:6]}", model_source=default.model_source, engine="llamacpp", max_batch_size=2))


@pytest.mark.parametrize("kind", ["transformers", "llamacpp"])
def test_a_replaced_engine_finishes_the_answer_on_it_then_refuses_new_ones(stack, folders, monkeypatch, kind):
    engine = _engine(kind, folders)
    name = f"reload-{kind}"
    monkeypatch.setitem(loader.ENGINES, name, engine)
    monkeypatch.setitem(loader.LOADED_AS, name, ("any",))
    result = GenerationResult()
    params = SamplingParams(max_new_tokens=64, temperature=0.0, top_k=0, top_p=1.0, do_sample=False)

    def answer():
        for _ in engine.stream(engine.prompt_ids("Tell me a long story about a dragon."), params, result, cancelled=lambda: False):
            pass

    running = threading.Thread(target=answer)
    running.start()
    while not result.completion_tokens:  # the answer is under way on the engine
        time.sleep(0.01)
    reload._drop(name)  # its deployment disabled: the engine closes once the answer is done
    running.join(DEADLINE)
    assert result.finish_reason in ("length", "stop"), f"the answer on it ran to its end, not {result.finish_reason!r}"
    if kind == "transformers":
        assert result.completion_tokens == 64
    deadline = time.monotonic() + DEADLINE
    while id(engine) in reload.RETIRING:
        assert time.monotonic() < deadline, "the engine was never closed"
        time.sleep(0.1)
    assert engine.scheduler._stopped and not engine.scheduler._thread.is_alive()
    if kind == "llamacpp":
        assert engine.model is None and engine.prefill_model is None, "its llama.cpp contexts are freed"
    late = BatchRequest(id="late", prompt_ids=[1, 2, 3], max_new_tokens=4, greedy=True)
    engine.scheduler.submit(late)  # a request that took the engine just before it closed
    kind, message = late.out.get(timeout=5)
    assert kind == "error" and "changed or disabled" in message
