"""A deployment changed in the admin after its worker loaded it (workers/reload.py): a new model is
loaded and answers without restarting the worker, a failed one is tried again once corrected, a
disabled one's engine is closed; and a replaced engine finishes the requests already on it."""

import gc
import threading
import time
import weakref
import uuid

import pytest
import requests

from chat.models import Deployment
from llmsite.contract import SamplingParams
from llmsite.launcher import worker_command
from tests.conftest import Process
from tests.tiny_models import always_emitting, build_tiny_model, default_tokenizer_files
from workers import loader, reload
from workers.engines.base import GenerationResult
from workers.engines.scheduling import CLOSED, BatchRequest

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


def _wait_status(name: str, status: str, after=None) -> Deployment:
    """The deployment once its status is `status`, set after `after` (a time; None: any time)."""
    deadline = time.monotonic() + DEADLINE
    while True:
        deployment = Deployment.objects.get(name=name)
        if deployment.status == status and (after is None or deployment.status_updated_at > after):
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
        _wait_status(main.name, Deployment.Status.READY)
        _wait_status(broken.name, Deployment.Status.FAILED)
        assert "Paris" not in _ask(stack, token, main.name).json()["response"]

        changed_at = Deployment.objects.get(name=main.name).status_updated_at
        main.model_source = folders["paris"]
        main.save()  # as the admin's change form does
        _wait_status(main.name, Deployment.Status.READY, changed_at)
        answer = _ask(stack, token, main.name)
        assert answer.status_code == 200 and answer.json()["response"].startswith(" Paris Paris"), answer.text
        _wait_for_closed(worker, 1)  # the random model's engine, which nothing shares

        failed_at = Deployment.objects.get(name=broken.name).status_updated_at
        broken.model_source = folders["random"]
        broken.save()
        loaded = _wait_status(broken.name, Deployment.Status.READY, failed_at)
        assert "model shared" not in loaded.status_detail, "loaded afresh: the replaced engine of that model is gone"
        answer = _ask(stack, token, broken.name)
        assert answer.status_code == 200 and "Paris" not in answer.json()["response"], answer.text

        Deployment.objects.filter(name=main.name).update(enabled=False)
        _wait_for_closed(worker, 2)  # the Paris model's engine
        assert Deployment.objects.get(name=main.name).status_detail.startswith("disabled: not loaded on")
        assert _ask(stack, token, broken.name).status_code == 200
        assert worker.alive(), worker.log_tail()
    finally:
        worker.stop()
        Deployment.objects.filter(name__startswith=prefix).update(enabled=False)


def _wait_for_closed(worker: Process, count: int) -> None:
    deadline = time.monotonic() + DEADLINE
    while worker.log_path.read_text(errors="replace").count("a replaced or dropped engine closed") < count:
        assert worker.alive() and time.monotonic() < deadline, worker.log_tail()
        time.sleep(0.2)


def _engine(kind: str, folders):
    """A transformers engine of the tiny model that always answers " Paris" (never an end of text
    before its length), or a llama.cpp engine of the default model."""
    if kind == "transformers":
        from workers.engines.transformers_engine import TransformersEngine

        return TransformersEngine(Deployment(name=f"reload-{uuid.uuid4().hex[:6]}", model_source=folders["paris"], model_type="llama2"))
    from workers.engines.llamacpp.engine import LlamaCppEngine

    default = Deployment.objects.get(name="default")
    return LlamaCppEngine(Deployment(name=f"reload-{uuid.uuid4().hex[:6]}", model_source=default.model_source, engine="llamacpp", max_batch_size=2))


def _answer(engine, result: GenerationResult) -> None:
    params = SamplingParams(max_new_tokens=64, temperature=0.0, top_k=0, top_p=1.0, do_sample=False)
    for _ in engine.stream(engine.prompt_ids("Tell me a long story about a dragon."), params, result, cancelled=lambda: False):
        pass


@pytest.mark.parametrize("kind", ["transformers", "llamacpp"])
def test_a_replaced_engine_finishes_the_answer_on_it_then_refuses_new_ones(stack, folders, kind):
    engine = _engine(kind, folders)
    name = f"reload-{kind}"
    loader.ENGINES[name], loader.LOADED_AS[name] = engine, ("as loaded",)  # as this worker's loader holds it
    result = GenerationResult()
    running = threading.Thread(target=_answer, args=(engine, result))
    running.start()
    deadline = time.monotonic() + DEADLINE
    while not result.completion_tokens:  # the answer is under way on the engine
        assert running.is_alive() and time.monotonic() < deadline, result
        time.sleep(0.01)
    reload._drop(name, None)  # its deployment deleted: the engine closes once the answer is done
    running.join(DEADLINE)
    assert result.finish_reason in ("length", "stop"), f"the answer on it ran to its end, not {result.finish_reason!r}"
    if kind == "transformers":
        assert result.completion_tokens == 64
    deadline = time.monotonic() + DEADLINE
    while id(engine) in loader.RETIRING:
        assert time.monotonic() < deadline, "the engine was never closed"
        time.sleep(0.1)
    scheduler = engine.scheduler
    assert scheduler._stopped and not scheduler._thread.is_alive()
    if kind == "llamacpp":
        assert engine.model is None and engine.prefill_model is None, "its llama.cpp contexts are freed"
    late = BatchRequest(id="late", prompt_ids=[1, 2, 3], max_new_tokens=4, greedy=True)
    scheduler.submit(late)  # a request that took the engine just before it closed
    got, message = late.out.get(timeout=5)
    assert got == "error" and message == CLOSED
    gone = weakref.ref(engine)
    del engine, scheduler, running
    gc.collect()
    assert gone() is None, "nothing holds the closed engine (its model's memory goes with it)"
