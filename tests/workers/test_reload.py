"""A deployment changed in the admin after its worker loaded it (workers/reload.py): a new model is
loaded and answers without restarting the worker, a failed one is tried again once corrected, a
disabled one's engine is closed, a re-enabled or added one is loaded; a replaced engine finishes
the requests already on it, and a request that took it as it closed goes to the new one."""

import asyncio
import contextlib
import gc
import logging
import threading
import time
import weakref
import uuid

import pytest
import requests

from chat import events, lifecycle
from chat.models import Deployment
from llmsite import contract
from llmsite.contract import GenerationRequest, SamplingParams
from llmsite.launcher import worker_command
from tests.conftest import Process
from tests.tiny_models import always_emitting, build_tiny_model, default_tokenizer_files
from tests.workers.direct import events_of, record
from workers import loader, reload, services
from workers.engines.base import GenerationResult
from workers.engines.scheduling import BatchRequest, EngineClosed

DEADLINE = 300  # a bound on polling, not a speed check


@pytest.fixture(scope="module")
def folders(stack, tmp_path_factory, django_db_blocker):
    """Tiny Llamas: one of random weights, and ones that always answer "Paris"."""
    root = tmp_path_factory.mktemp("reload")
    with django_db_blocker.unblock():
        files = default_tokenizer_files()
    random = build_tiny_model(root / "random", "llama", files)
    paris = always_emitting(build_tiny_model(root / "paris", "llama", files), " Paris")
    # one that answers " Paris" for 32768 tokens: an answer that runs until stopped
    long = always_emitting(build_tiny_model(root / "long", "llama", files, max_position_embeddings=32768), " Paris")
    return {"random": str(random), "paris": str(paris), "long": str(long)}


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

        broken.max_batch_size = 2  # what the engine is sized by: loaded again too
        broken.save()
        _wait_status(broken.name, Deployment.Status.READY, loaded.status_updated_at)
        _wait_for_closed(worker, 2)  # the random model's engine of batch size 32
        assert _ask(stack, token, broken.name).status_code == 200

        Deployment.objects.filter(name=main.name).update(enabled=False)
        _wait_for_closed(worker, 3)  # the Paris model's engine
        disabled = Deployment.objects.get(name=main.name)
        assert disabled.status_detail.startswith("disabled: not loaded on")
        assert _ask(stack, token, broken.name).status_code == 200

        Deployment.objects.filter(name=main.name).update(enabled=True)  # loaded again before any request
        _wait_status(main.name, Deployment.Status.READY, disabled.status_updated_at)
        added = Deployment.objects.create(name=f"{prefix}-added", queue=broken.name, model_source=folders["paris"], model_type="llama2")
        assert "model shared" in _wait_status(added.name, Deployment.Status.READY).status_detail  # the Paris engine again
        answer = _ask(stack, token, added.name)
        assert answer.status_code == 200 and answer.json()["response"].startswith(" Paris Paris"), answer.text
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
    assert late.out.get(timeout=5) == ("closed", None)
    with pytest.raises(EngineClosed, match="changed or disabled"):
        _answer(engine, GenerationResult())
    gone = weakref.ref(engine)
    del engine, scheduler, running
    gc.collect()
    assert gone() is None, "nothing holds the closed engine (its model's memory goes with it)"


@pytest.mark.parametrize("taken", ["closed", "unloaded", "disabled"])
def test_a_request_that_took_an_engine_as_it_closed_goes_to_the_new_one(stack, user, folders, monkeypatch, taken):
    """The instant between a request taking its deployment's engine and submitting to it, in which
    a reload may close that engine, or between finding it loaded and taking it, in which a reload
    may unload it: the request is answered by the engine that replaced it, or, its deployment
    disabled, ends with an error and nothing generated; in-process as a worker runs it."""
    from workers.engines.transformers_engine import TransformersEngine

    name, replaced = f"reroute-{uuid.uuid4().hex[:6]}", taken != "disabled"
    row = Deployment.objects.create(name=name, model_source=folders["paris"], model_type="llama2", enabled=replaced)
    old = TransformersEngine(Deployment(name=name, model_source=folders["random"], model_type="llama2"))
    assert old.close(DEADLINE)
    new = TransformersEngine(row) if replaced else None
    if replaced:
        loader.ENGINES[name], loader.LOADED_AS[name] = new, loader.model_key(row)
    given = [None if taken == "unloaded" else old]  # what engine_for gave the request in that instant
    real_engine_for = loader.engine_for
    monkeypatch.setattr(loader, "engine_for", lambda deployment, *waits: given.pop() if given else real_engine_for(deployment, *waits))
    request = _request(user, row)
    try:
        services.run_generation(request)
        heard = events_of(request.request_id)
    finally:
        loader.ENGINES.pop(name, None)
        loader.LOADED_AS.pop(name, None)
        if new is not None:
            new.close(DEADLINE)
    assert not given, "the request took the closed (or no) engine first"
    if replaced:
        assert isinstance(heard[-1], contract.Final) and heard[-1].text.startswith(" Paris Paris"), heard
        assert not any(isinstance(e, contract.Error) for e in heard), heard
    else:
        assert isinstance(heard[-1], contract.Error) and f"'{name}' is disabled" in heard[-1].message, heard
        assert not any(isinstance(e, contract.Delta) for e in heard), heard


def test_without_room_for_both_models_the_old_engine_closes_before_the_new_one_loads(stack, folders, settings, caplog):
    """WORKER_RELOAD_MODE "replace" (what "auto" does where the GPUs lack room for a second copy):
    the answer on the old engine runs to its end, the old engine closes and its model is gone (though
    the engine itself is still held here, as a request thread may hold it), then the new model
    loads; the deployment answers from it."""
    row = Deployment.objects.create(name=f"replace-{uuid.uuid4().hex[:6]}", model_source=folders["random"], model_type="llama2")
    loader.load_deployment(row)  # as the worker's start loads it
    old = loader.ENGINES[row.name]
    assert settings.WORKER_RELOAD_MODE == "auto" and reload._fits_beside(old, row), "auto: beside, on CPUs"
    settings.WORKER_RELOAD_MODE = "replace"
    assert not reload._fits_beside(old, row)
    result = GenerationResult()
    running = threading.Thread(target=_answer, args=(old, result))
    running.start()
    deadline = time.monotonic() + DEADLINE
    while not result.completion_tokens:  # the answer is under way on the old engine
        assert running.is_alive() and time.monotonic() < deadline, result
        time.sleep(0.01)
    row.model_source = folders["paris"]
    row.save()
    old_model = weakref.ref(old.model)
    at_new_load = _AtLog(f"loading {folders['paris']}", lambda: old_model() is None)
    shown = Deployment.objects.values_list("status", "status_detail")
    at_close = _AtLog("a replaced or dropped engine closed", lambda: shown.get(pk=row.pk))
    for handler in (at_new_load, at_close):
        logging.getLogger("workers").addHandler(handler)
    try:
        with caplog.at_level(logging.INFO, logger="workers"):
            _reload(row)
        assert at_new_load.results == [True], "the old model's memory was given back before the new model loaded"
        [(status, detail)] = at_close.results  # what the admin showed while the answer on the old model ran on
        assert status == Deployment.Status.LOADING and "once the answers on the old one have ended" in detail, detail
        running.join(DEADLINE)
        assert result.finish_reason == "length" and result.completion_tokens == 64, "the answer on it ran to its end"
        messages = [r.getMessage() for r in caplog.records]
        ready = max(i for i, m in enumerate(messages) if m.startswith(f"deployment {row.name} ready"))  # the new model's
        assert messages.index("a replaced or dropped engine closed") < ready, messages
        assert not old.scheduler._thread.is_alive() and id(old) not in loader.RETIRING
        text = _louvre_answer(loader.ENGINES[row.name])
        assert text.startswith(" Paris Paris"), text
    finally:
        for handler in (at_new_load, at_close):
            logging.getLogger("workers").removeHandler(handler)
        reload._drop(row.name, None)


def _reload(row) -> None:
    """The deployment's reload, as the worker's reload thread starts it, run to its end."""
    load = reload.start_reload(row)
    load.join(DEADLINE)
    assert not load.is_alive() and load.error is None, load.error


class _AtLog(logging.Handler):
    """What `check()` says at the moment a log message starting with `start` is written."""

    def __init__(self, start: str, check):
        super().__init__(logging.INFO)
        self.start, self.check, self.results = start, check, []

    def emit(self, record: logging.LogRecord) -> None:
        if record.getMessage().startswith(self.start):
            self.results.append(self.check())


def test_a_deployment_moved_to_another_queue_is_not_loaded_by_a_late_request(stack, folders, monkeypatch):
    """A request sent before its deployment moved to a queue this worker does not take finds no
    engine here, instead of loading the model on a worker that no longer serves it."""
    monkeypatch.setattr(loader, "QUEUES", {"this-workers-queue"})
    row = Deployment.objects.create(
        name=f"moved-{uuid.uuid4().hex[:6]}", queue="another-queue", model_source=folders["paris"], model_type="llama2"
    )
    assert loader.engine_for(row) is None
    assert row.name not in loader.ENGINES and row.name not in loader.LOADED_AS


@pytest.mark.parametrize("case", ["alone", "shared", "beside"])
def test_where_the_new_model_runs_out_of_memory_beside_the_old_one_that_one_closes_first_where_it_can(
    stack, folders, settings, monkeypatch, case
):
    """WORKER_RELOAD_MODE "auto" where a second copy seemed to fit but did not: the load beside the
    old engine fails for want of memory (raised here as PyTorch raises it on a full GPU, which these
    CPUs cannot give safely), so the old engine closes and the new model loads again, alone. Where
    the old engine cannot close first (another deployment shares it, or the mode is "beside"), the
    deployment fails with the reason and why the old engine stayed; the old engine serves on."""
    import torch

    from workers import engines

    prefix = f"oom-{uuid.uuid4().hex[:6]}"
    row = Deployment.objects.create(name=prefix, model_source=folders["random"], model_type="llama2")
    loader.load_deployment(row)
    old = loader.ENGINES[row.name]
    if case == "shared":
        loader.load_deployment(Deployment.objects.create(name=f"{prefix}-twin", model_source=folders["random"], model_type="llama2"))
        assert loader.ENGINES[f"{prefix}-twin"] is old
    settings.WORKER_RELOAD_MODE = "beside" if case == "beside" else "auto"
    assert reload._fits_beside(old, row)
    real_engine_class, tries, shown = engines.engine_class, [], []

    def engine_class(name):
        def build(deployment):
            tries.append(old.scheduler._thread.is_alive())  # whether the old engine still runs at this load
            shown.append(Deployment.objects.values_list("status_detail", flat=True).get(pk=row.pk))
            if len(tries) == 1:
                raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total capacity of 79.19 GiB")
            return real_engine_class(name)(deployment)

        return build

    monkeypatch.setattr(engines, "engine_class", engine_class)
    row.model_source = folders["paris"]
    row.save()
    try:
        _reload(row)
        row.refresh_from_db()
        if case != "alone":
            assert tries == [True] and row.status == Deployment.Status.FAILED and row.name not in loader.ENGINES
            why = f"which {prefix}-twin still use" if case == "shared" else "as WORKER_RELOAD_MODE 'beside' asks"
            assert "CUDA out of memory" in row.status_detail and why in row.status_detail, row.status_detail
            assert loader.FAILED[row.name] == row.status_detail
            deadline = time.monotonic() + DEADLINE
            while id(old) in loader.RETIRING:  # closing, unless still used
                assert time.monotonic() < deadline, "the engine was never closed"
                time.sleep(0.1)
            still_used = case == "shared"
            assert old.scheduler._thread.is_alive() == still_used and (loader.ENGINES.get(f"{prefix}-twin") is old) == still_used
            return
        assert tries == [True, False], "loaded beside the old engine first, then after it closed"
        assert "the old one answers until it is ready" in shown[0] and shown[1].startswith("loading on"), shown
        assert id(old) not in loader.RETIRING and old.model is None
        assert row.status == Deployment.Status.READY and row.name not in loader.FAILED, row.status_detail
        text = _louvre_answer(loader.ENGINES[row.name])
        assert text.startswith(" Paris Paris"), text
    finally:
        for name in (row.name, f"{prefix}-twin"):
            reload._drop(name, None)


@pytest.mark.parametrize("end", ["stopped", "waited too long"])
def test_a_request_stopped_or_waiting_too_long_for_its_model_ends_while_the_load_goes_on(stack, user, folders, settings, end):
    """A request whose deployment is not loaded starts its load, which waits for the loader's lock
    (a load or a reload holds it for minutes; a thread of the test's here): its Stop ends it as
    stopped, or WORKER_LOAD_WAIT_SECONDS ends it with an error, while the lock is still held; the
    load goes on for the requests after it."""
    if end == "waited too long":
        settings.WORKER_LOAD_WAIT_SECONDS = 1
    row = _paris_row(folders, "waiting")
    request = _request(user, row)
    with _loader_lock_held() as (holder, _):
        running = _run_until_its_load_waits(request)
        if end == "stopped":
            events.sync_client().set(events.cancel_key(request.request_id), b"1", ex=60)  # as the web tier's Stop does
        running.join(DEADLINE)
        assert not running.is_alive() and holder.is_alive(), "it ended while the lock was still held"
    heard = events_of(request.request_id)
    assert not any(isinstance(e, contract.Delta) for e in heard), heard
    if end == "stopped":
        assert isinstance(heard[-1], contract.Final) and heard[-1].finish_reason == "cancelled" and heard[-1].text == "", heard
        assert lifecycle.status_of(request.request_id) == lifecycle.Status.CANCELLED
    else:
        assert isinstance(heard[-1], contract.Error) and f"'{row.name}' is still loading after 1 s" in heard[-1].message, heard
        assert lifecycle.status_of(request.request_id) == lifecycle.Status.ERROR
    try:
        loader._LOADS[row.name].join(DEADLINE)
        assert row.name in loader.ENGINES, "the load went on once the lock was free"
    finally:
        reload._drop(row.name, None)


def test_a_deployment_disabled_while_its_request_waited_for_its_load_is_not_loaded(stack, user, folders):
    """The load a request started waits for the loads before it (the loader's lock), which may
    have dropped its deployment meanwhile: it reads the row again and loads nothing; the request
    says the deployment is disabled."""
    row = _paris_row(folders, "dropped")
    request = _request(user, row)
    with _loader_lock_held():
        running = _run_until_its_load_waits(request)
        Deployment.objects.filter(pk=row.pk).update(enabled=False)  # as the admin's change form does
    running.join(DEADLINE)
    loader._LOADS[row.name].join(DEADLINE)
    heard = events_of(request.request_id)
    assert isinstance(heard[-1], contract.Error) and f"'{row.name}' is disabled" in heard[-1].message, heard
    assert row.name not in loader.ENGINES and row.name not in loader.LOADED_AS, "nothing was loaded for it"


def _request(user, row) -> GenerationRequest:
    """A short greedy request for the deployment, stored as the web tier stores it."""
    sampling = SamplingParams(max_new_tokens=4, temperature=0.0, top_k=0, top_p=1.0, do_sample=False)
    request = GenerationRequest(str(uuid.uuid4()), row.name, [{"role": "user", "content": "Where is the Louvre?"}], sampling)
    record(user, request)
    return request


def _run_until_its_load_waits(request) -> threading.Thread:
    """The request run as a worker runs it, in a thread of its own, once the load of its deployment
    that it started waits for the loader's lock."""
    running = threading.Thread(target=services.run_generation, args=(request,))
    running.start()
    deadline = time.monotonic() + DEADLINE
    while request.deployment not in loader._LOADS:
        assert running.is_alive() and time.monotonic() < deadline
        time.sleep(0.05)
    return running


def _paris_row(folders, prefix: str) -> Deployment:
    """A deployment of the tiny model that always answers " Paris", not loaded on any worker."""
    return Deployment.objects.create(name=f"{prefix}-{uuid.uuid4().hex[:6]}", model_source=folders["paris"], model_type="llama2")


@contextlib.contextmanager
def _loader_lock_held():
    """(a thread holding the loader's lock, as a load or a reload does, and the event that makes it
    let go, which the block's end sets too)."""
    held, release = threading.Event(), threading.Event()

    def hold():
        with loader.lock:
            held.set()
            release.wait(DEADLINE)

    holder = threading.Thread(target=hold)
    holder.start()
    held.wait(DEADLINE)
    try:
        yield holder, release
    finally:
        release.set()
        holder.join()


def test_a_request_that_waits_for_its_model_longer_than_the_stream_timeout_is_answered(stack, user, folders, settings):
    """A load (here the loader's lock held for 2.5 stream timeouts, then the model's own load) is
    not silence: the waiting request says so on its stream, with how long it has waited, which the
    web tier's reader takes as a word from the worker (and yields, for the chat page to show), so
    the answer comes instead of a timeout error."""
    settings.STREAM_TIMEOUT_SECONDS = 2
    row = _paris_row(folders, "slow-load")
    request = _request(user, row)
    words = []

    async def read(holder):
        async def received():
            words.append(holder.is_alive())

        return [e async for e in events.Subscription(request.request_id).events(on_received=received)]

    running = threading.Thread(target=services.run_generation, args=(request,))
    try:
        with _loader_lock_held() as (holder, release):
            timer = threading.Timer(2.5 * settings.STREAM_TIMEOUT_SECONDS, release.set)
            timer.start()
            running.start()
            try:
                heard = asyncio.run(read(holder))  # as the web tier reads it: StreamTimeout after 2 s of silence
            finally:
                timer.cancel()
    finally:
        running.join(DEADLINE)
        reload._drop(row.name, None)
    assert isinstance(heard[-1], contract.Final) and heard[-1].text.startswith(" Paris Paris"), heard
    assert words.count(True) >= 2, f"said while it waited: {words}"
    waited = [e.loading_seconds for e in heard if isinstance(e, contract.Received)]  # what the chat page shows
    assert len(waited) >= 2 and waited == sorted(waited) and waited[-1] >= 2 * settings.STREAM_TIMEOUT_SECONDS, waited


def test_while_an_old_engine_closes_first_other_deployments_load_and_its_requests_wait_for_its_new_model(
    stack, user, folders, settings
):
    """WORKER_RELOAD_MODE "replace": while the answer on the old engine runs on (here until the test
    stops it), the old engine waits without the loader's lock: another deployment's first load ends
    meanwhile. A request for the reloaded deployment waits for its reload, not a load of its own
    beside the old engine, and is answered by the new model once the old one has closed."""
    row = Deployment.objects.create(name=f"drain-{uuid.uuid4().hex[:6]}", model_source=folders["long"], model_type="llama2")
    other = Deployment.objects.create(
        name=f"meanwhile-{uuid.uuid4().hex[:6]}", model_source=folders["random"], model_type="llama2"
    )
    request = _request(user, row)
    try:
        with _closing_first(row, folders["paris"], settings) as (old, result, reloading, at_new_load):
            asking = threading.Thread(target=services.run_generation, args=(request,))
            asking.start()
            _wait_until(lambda: _told_loading(request.request_id), result)  # it waits for the reload, and says so
            first_load = loader.start_load(other)
            _wait_until(lambda: not first_load.is_alive(), result)  # not until the answer on the old engine has ended
            assert other.name in loader.ENGINES and first_load.error is None, first_load.error
            assert reloading.is_alive() and asking.is_alive() and row.name not in loader.ENGINES
            assert row.name in loader.LOADING, "/metrics shows it loading"
        asking.join(DEADLINE)
        assert at_new_load.results == [True], "the new model loaded once, after the old one's memory was given back"
        heard = events_of(request.request_id)
        assert isinstance(heard[-1], contract.Final) and heard[-1].text.startswith(" Paris Paris"), heard
        assert loader.ENGINES[row.name] is not old and old.model is None
    finally:
        for name in (row.name, other.name):
            reload._drop(name, None)


def test_a_deployment_disabled_while_its_old_engine_closed_first_is_not_loaded_again(stack, user, folders, settings):
    """Disabled in the admin while its old engine waited for the answer on it: the reload loads
    nothing once that engine has closed, the deployment's status says it is disabled, and the
    request that waited for the reload is told so."""
    row = Deployment.objects.create(name=f"drain-{uuid.uuid4().hex[:6]}", model_source=folders["long"], model_type="llama2")
    request = _request(user, row)
    with _closing_first(row, folders["paris"], settings) as (_, result, reloading, at_new_load):
        asking = threading.Thread(target=services.run_generation, args=(request,))
        asking.start()
        _wait_until(lambda: _told_loading(request.request_id), result)  # it waits for the reload
        Deployment.objects.filter(pk=row.pk).update(enabled=False)  # as the admin's change form does
    asking.join(DEADLINE)
    assert at_new_load.results == [] and row.name not in loader.ENGINES and row.name not in loader.LOADED_AS
    row.refresh_from_db()
    assert row.status == Deployment.Status.UNKNOWN and row.status_detail.startswith("disabled"), row.status_detail
    heard = events_of(request.request_id)
    assert isinstance(heard[-1], contract.Error) and f"'{row.name}' is disabled" in heard[-1].message, heard


def test_a_new_model_that_runs_out_of_memory_after_the_old_one_closed_names_what_loaded_meanwhile(
    stack, folders, settings, monkeypatch
):
    """Another deployment loaded while the old engine closed first, and took the memory it gave back
    (the new model's load raises as PyTorch does on a full GPU): the deployment fails with the
    reason and that deployment named."""
    row = Deployment.objects.create(name=f"drain-{uuid.uuid4().hex[:6]}", model_source=folders["long"], model_type="llama2")
    other = Deployment.objects.create(name=f"took-{uuid.uuid4().hex[:6]}", model_source=folders["random"], model_type="llama2")
    _out_of_memory_where(monkeypatch, lambda deployment: deployment.name == row.name and deployment.model_source == folders["paris"])
    try:
        with _closing_first(row, folders["paris"], settings) as (_, result, _, _):
            first_load = loader.start_load(other)
            _wait_until(lambda: not first_load.is_alive(), result)
        failed = Deployment.objects.get(pk=row.pk)
        assert failed.status == Deployment.Status.FAILED and "CUDA out of memory" in failed.status_detail, failed.status_detail
        assert f"while its old model closed, {other.name} loaded on" in failed.status_detail, failed.status_detail
        assert loader.FAILED[row.name] == failed.status_detail and row.name not in loader.ENGINES
    finally:
        for name in (row.name, other.name):
            reload._drop(name, None)


@contextlib.contextmanager
def _closing_first(row, new_source: str, settings):
    """The deployment `row` loaded, then changed to `new_source` and reloaded with no room for both
    models, while an answer runs on its old engine until the block's end stops it: (the old engine,
    that answer's result, the reload's thread, what _AtLog saw at the new model's load: whether the
    old one's memory was given back), once the old engine waits for that answer. At the end the
    reload has ended."""
    loader.load_deployment(row)
    old = loader.ENGINES[row.name]
    settings.WORKER_RELOAD_MODE = "replace"
    result, stop = GenerationResult(), threading.Event()
    params = SamplingParams(max_new_tokens=30000, temperature=0.0, top_k=0, top_p=1.0, do_sample=False)
    answer = old.stream(old.prompt_ids("Tell me a long story about a dragon."), params, result, cancelled=stop.is_set)
    running = threading.Thread(target=lambda: [None for _ in answer])
    running.start()
    _wait_until(lambda: result.completion_tokens, result)  # the answer is under way on the old engine
    row.model_source = new_source
    row.save()
    old_model = weakref.ref(old.model)
    at_new_load = _AtLog(f"loading {new_source}", lambda: old_model() is None)
    logging.getLogger("workers").addHandler(at_new_load)
    try:
        reloading = reload.start_reload(row)
        _wait_until(lambda: id(old) in loader.RETIRING, result)  # the old engine waits for the answer on it
        yield old, result, reloading, at_new_load
        stop.set()
        for thread in (running, reloading):
            thread.join(DEADLINE)
        assert result.finish_reason == "cancelled" and reloading.error is None, (result, reloading.error)
    finally:
        stop.set()
        logging.getLogger("workers").removeHandler(at_new_load)


def _wait_until(done, answer: GenerationResult) -> None:
    """Until `done()`, while the answer on the old engine runs on: it must not end first."""
    deadline = time.monotonic() + DEADLINE
    while not done():
        assert not answer.finish_reason, f"the answer on the old engine ended first ({answer.finish_reason})"
        assert time.monotonic() < deadline
        time.sleep(0.05)


def _told_loading(request_id: str) -> bool:
    """Whether the request's stream says its worker waits for its model's load."""
    told = (contract.decode(fields[b"e"]) for _, fields in events.sync_client().xrange(events.channel(request_id)))
    return any(isinstance(e, contract.Received) and e.loading_seconds is not None for e in told)


@pytest.mark.parametrize("meanwhile", ["disabled", "changed back"])
def test_a_reload_that_waited_for_the_loaders_lock_works_from_its_row_as_it_is_then(stack, folders, meanwhile):
    """A reload waits for the loads before it (the loader's lock, held by a thread of the test's
    here), during which the row may change again: disabled, its engine is closed and nothing loads;
    changed back, its engine stays."""
    row = Deployment.objects.create(name=f"stale-{uuid.uuid4().hex[:6]}", model_source=folders["random"], model_type="llama2")
    loader.load_deployment(row)
    old = loader.ENGINES[row.name]
    row.model_source = folders["paris"]
    row.save()
    at_new_load = _AtLog(f"loading {folders['paris']}", lambda: True)
    logging.getLogger("workers").addHandler(at_new_load)
    try:
        with _loader_lock_held():
            reloading = reload.start_reload(row)
            changed = {"enabled": False} if meanwhile == "disabled" else {"model_source": folders["random"]}
            Deployment.objects.filter(pk=row.pk).update(**changed)  # as the admin's change form does
        reloading.join(DEADLINE)
        assert reloading.error is None and at_new_load.results == [], "the model of the row it was started from is not loaded"
        if meanwhile == "changed back":
            assert loader.ENGINES[row.name] is old and old.scheduler._thread.is_alive()
            return
        assert row.name not in loader.ENGINES and row.name not in loader.LOADED_AS
        assert Deployment.objects.get(pk=row.pk).status_detail.startswith("disabled"), "its status says so"
        deadline = time.monotonic() + DEADLINE
        while id(old) in loader.RETIRING or old.scheduler._thread.is_alive():
            assert time.monotonic() < deadline, "the engine was never closed"
            time.sleep(0.1)
    finally:
        logging.getLogger("workers").removeHandler(at_new_load)
        reload._drop(row.name, None)


def test_a_request_for_a_failed_deployment_whose_fix_is_loading_waits_for_it(stack, user, folders):
    """A failed deployment corrected in the admin: a request that comes while its reload waits for
    the loads before it waits for that reload, and is answered, instead of getting the old failure."""
    row = Deployment.objects.create(name=f"fixed-{uuid.uuid4().hex[:6]}", model_source=folders["paris"] + "-missing", model_type="llama2")
    loader.load_deployment(row)
    assert row.name in loader.FAILED
    row.model_source = folders["paris"]
    row.save()
    request = _request(user, row)
    try:
        with _loader_lock_held():
            reloading = reload.start_reload(row)
            running = threading.Thread(target=services.run_generation, args=(request,))
            running.start()
            deadline = time.monotonic() + DEADLINE
            while not _told_loading(request.request_id):  # it waits, and says so
                assert running.is_alive() and time.monotonic() < deadline, events_of(request.request_id)
                time.sleep(0.05)
        running.join(DEADLINE)
        assert reloading.error is None, reloading.error
        heard = events_of(request.request_id)
        assert isinstance(heard[-1], contract.Final) and heard[-1].text.startswith(" Paris Paris"), heard
    finally:
        reload._drop(row.name, None)


def test_a_reload_that_ended_without_its_model_after_the_old_one_closed_is_loaded_at_the_next_look(stack, folders, monkeypatch):
    """The new model ran out of memory beside the old one (raised as in the test above), so the old
    one closed first; then the database went away before the new model's second load: the reload
    ends with the deployment holding no model, and the worker's next look loads it, as an added one."""
    from django.db import OperationalError

    queue = f"q-{uuid.uuid4().hex[:6]}"  # only this deployment: the worker's look loads every enabled one of its queues
    monkeypatch.setattr(loader, "LOADED_AS", {})  # and drops every other it holds: none here
    row = Deployment.objects.create(name=queue, queue=queue, model_source=folders["random"], model_type="llama2")
    loader.load_deployment(row)
    real_still_served, builds, reads = loader.still_served, [], []
    _out_of_memory_where(monkeypatch, lambda deployment: builds.append(deployment.name) or len(builds) == 1)  # the first load

    def still_served(deployment):
        reads.append(deployment.name)
        if len(reads) == 2:  # the read after the old engine closed
            raise OperationalError("the database went away")
        return real_still_served(deployment)

    monkeypatch.setattr(loader, "still_served", still_served)
    row.model_source = folders["paris"]
    row.save()
    try:
        reloading = reload.start_reload(row)
        reloading.join(DEADLINE)
        assert isinstance(reloading.error, OperationalError) and row.name not in loader.ENGINES and row.name not in loader.FAILED
        reload.refresh({queue})
        loader._LOADS[row.name].join(DEADLINE)
        text = _louvre_answer(loader.ENGINES[row.name])
        assert text.startswith(" Paris Paris"), text
    finally:
        reload._drop(row.name, None)


def _louvre_answer(engine) -> str:
    """The engine's greedy answer of 4 tokens to "Where is the Louvre?"."""
    params = SamplingParams(max_new_tokens=4, temperature=0.0, top_k=0, top_p=1.0, do_sample=False)
    return "".join(engine.stream(engine.prompt_ids("Where is the Louvre?"), params, GenerationResult(), lambda: False))


def _out_of_memory_where(monkeypatch, fails) -> None:
    """Loads of a deployment for which `fails(deployment)` raise as PyTorch does on a full GPU
    (which these CPUs cannot give safely); the others load as they do."""
    import torch

    from workers import engines

    real_engine_class = engines.engine_class

    def engine_class(name):
        def build(deployment):
            if fails(deployment):
                raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB.")
            return real_engine_class(name)(deployment)

        return build

    monkeypatch.setattr(engines, "engine_class", engine_class)
