"""Which deployments this worker serves: loaded when the worker starts (or at a first request),
and loaded again when an operator changes what their engine was loaded with (workers/reload.py)."""

import logging
import threading
import time
from collections.abc import Callable

from celery.signals import celeryd_after_setup, task_received, worker_shutdown
from django.db import close_old_connections
from django.utils import timezone

log = logging.getLogger(__name__)

# deployment name -> loaded engine, or the LoadError message when it could not load
ENGINES: dict[str, object] = {}
FAILED: dict[str, str] = {}
LOADING: set[str] = set()  # deployments whose model is being loaded now (/metrics' load state)
LOADED_AS: dict[str, tuple] = {}  # deployment name -> the model key its engine (or its failure) came from
# the model key (model_key) -> engine: deployments of the same model, sized alike, share one copy
BY_MODEL: dict[tuple, object] = {}
RETIRING: dict[int, object] = {}  # id -> a replaced engine waiting for its requests before it closes (workers/reload.py)
lock = threading.RLock()
HOSTNAME = ""
QUEUES: set[str] = set()  # the worker's queues (empty outside a worker: every deployment is served)
WAIT_POLL_SECONDS = 0.25  # how often a request waiting for a load looks at its cancel flag


# What an engine is loaded from: the model type sets its stop tokens, and remote code changes what is loaded.
MODEL_FIELDS = ("engine", "model_source", "precision", "model_type", "trust_remote_code")
# What each engine is sized by at its load (the transformers engine's context is its model's own:
# the worker fits prompts to the deployment's at each request)
SIZED_BY = {
    "transformers": ("max_batch_size",),
    "llamacpp": ("max_batch_size", "context_length"),
    "vllm": ("max_batch_size", "context_length"),
}


def model_key(deployment) -> tuple:
    """What the deployment's engine is loaded from and sized by, as (field, value) pairs: deployments
    of one key share one engine, and a changed key loads it again (workers/reload.py)."""
    return tuple((field, getattr(deployment, field)) for field in (*MODEL_FIELDS, *SIZED_BY.get(deployment.engine, ())))


def set_status(deployment, status, detail="", **fields):
    from chat.models import Deployment

    Deployment.objects.filter(pk=deployment.pk).update(
        status=status, status_detail=detail, status_updated_at=timezone.now(), **fields
    )


def load_deployment(deployment, loading: str = "") -> None:
    """Load the deployment's engine, or share the loaded one of its model key; `loading`: its
    status's detail while it loads ("loading on <worker>" where empty)."""
    from chat.models import Deployment

    with lock:
        engine = BY_MODEL.get(model_key(deployment))
        if engine is None:
            _load_new(deployment, loading)
            return
        ENGINES[deployment.name] = engine
        LOADED_AS[deployment.name] = model_key(deployment)
        set_status(
            deployment,
            Deployment.Status.READY,
            f"ready on {HOSTNAME} (model shared)",
            model_context_length=engine.context_length,
            tokenizer_files=engine.tokenizer_files(),
        )


def _load_new(deployment, loading: str) -> None:
    from chat.models import Deployment
    from workers.engines import LoadError, engine_class

    set_status(deployment, Deployment.Status.LOADING, loading or f"loading on {HOSTNAME}")
    started = time.monotonic()
    LOADING.add(deployment.name)
    try:
        engine = engine_class(deployment.engine)(deployment)
    except LoadError as exc:
        log.error("deployment %s failed to load: %s", deployment.name, exc)
        FAILED[deployment.name] = str(exc)
        LOADED_AS[deployment.name] = model_key(deployment)
        set_status(deployment, Deployment.Status.FAILED, str(exc))
        return
    except Exception as exc:  # an unknown failure must not crash-loop the worker either
        log.exception("deployment %s failed to load", deployment.name)
        FAILED[deployment.name] = f"{type(exc).__name__}: {exc}"
        LOADED_AS[deployment.name] = model_key(deployment)
        set_status(deployment, Deployment.Status.FAILED, FAILED[deployment.name])
        return
    finally:
        LOADING.discard(deployment.name)
    ENGINES[deployment.name] = engine
    BY_MODEL[model_key(deployment)] = engine
    FAILED.pop(deployment.name, None)
    LOADED_AS[deployment.name] = model_key(deployment)
    set_status(
        deployment,
        Deployment.Status.READY,
        "; ".join([f"ready on {HOSTNAME} after {time.monotonic() - started:.1f}s", *getattr(engine, "load_notes", [])]),
        model_context_length=engine.context_length,
        tokenizer_files=engine.tokenizer_files(),
    )
    log.info("deployment %s ready (%.1fs)", deployment.name, time.monotonic() - started)


def is_loaded(name: str) -> bool:
    return name in ENGINES


class WaitCancelled(Exception):
    """The request was stopped (Stop, its client gone) while it waited for its deployment's model."""


class StillLoading(Exception):
    """The deployment's model was not loaded within WORKER_LOAD_WAIT_SECONDS (its load goes on)."""


def engine_for(deployment, cancelled: Callable[[], bool] = lambda: False, waiting: Callable[[], None] = lambda: None):
    """The engine of a deployment on this worker's queues, loaded on first use if it was added later.

    The load runs in a thread of its own, one per deployment at a time, once the loads and reloads
    before it are done (the loader's lock: workers/reload.py holds it too); where the deployment's
    reload is under way (its old engine closing first), the request waits for that instead. The
    caller (which must not hold that lock) waits for it, calling `waiting()` every
    WAIT_POLL_SECONDS; the wait ends with WaitCancelled once `cancelled()` says so, or StillLoading
    after WORKER_LOAD_WAIT_SECONDS, and the load goes on for the requests after it."""
    from django.conf import settings

    from chat.services import release_connection

    engine = ENGINES.get(deployment.name)
    if engine is not None or (deployment.name in FAILED and not load_pending(deployment.name)):
        return engine  # without the lock: a reload holds it for minutes (a failed one being reloaded is waited for)
    if deployment.pk is None or not deployment.enabled:  # a request from before it was dropped (workers/reload.py)
        return None
    if QUEUES and deployment.queue not in QUEUES:  # moved to another queue since the request was sent
        return None
    release_connection()  # none held through a wait of minutes
    load, deadline = start_load(deployment), time.monotonic() + settings.WORKER_LOAD_WAIT_SECONDS
    while True:
        load.join(WAIT_POLL_SECONDS)
        if not load.is_alive() or deployment.name in ENGINES:  # loaded, by this load or one before it found
            break
        if cancelled():
            raise WaitCancelled(deployment.name)
        if time.monotonic() > deadline:
            raise StillLoading(deployment.name)
        waiting()
    if deployment.name not in ENGINES and load.error is not None:  # the database away at its status, say
        raise load.error
    return ENGINES.get(deployment.name)


class _Load(threading.Thread):
    """A deployment's load (or reload: workers/reload.py) for the requests that wait for it."""

    def __init__(self, deployment, work: Callable):
        super().__init__(name=f"load-{deployment.name}", daemon=True)
        self.deployment, self.work, self.error = deployment, work, None

    def run(self) -> None:
        from django.db import connection

        try:
            self.work(self.deployment)
        except Exception as exc:
            log.exception("deployment %s could not be loaded", self.deployment.name)
            self.error = exc.with_traceback(None)  # its frames (an old engine, say) are not kept alive with it
        finally:
            connection.close()  # this thread's own


def still_served(deployment):
    """The deployment's row as it is now, where it is still enabled on this worker's queues (a load
    that waited may find it dropped or moved meanwhile); else None."""
    from chat.models import Deployment

    row = Deployment.objects.defer("tokenizer_files").filter(pk=deployment.pk, enabled=True).first()
    return row if row is not None and (not QUEUES or row.queue in QUEUES) else None


def _load_unless_dropped(deployment) -> None:
    """A first load: once the loads before it are done, unless one of them dropped it or loaded it."""
    with lock:
        row = still_served(deployment)
        if row is not None and row.name not in ENGINES and row.name not in FAILED:
            load_deployment(row)


_LOADS: dict[str, _Load] = {}
_loads_lock = threading.Lock()


def load_pending(name: str) -> bool:
    """Whether a load or reload of the deployment was started and has not ended."""
    load = _LOADS.get(name)
    return load is not None and load.is_alive()


def start_load(deployment, work: Callable = _load_unless_dropped) -> _Load:
    """The deployment's load or reload under way, or `work(deployment)` started now in a thread of
    its own (which waits for the loads before it), for the requests of the deployment to wait on."""
    with _loads_lock:
        load = _LOADS.get(deployment.name)
        if load is None or not load.is_alive():
            load = _LOADS[deployment.name] = _Load(deployment, work)
            load.start()
        return load


def load_for_queues(queues) -> None:
    from chat.models import Deployment

    deployments = [d for d in Deployment.objects.filter(enabled=True) if d.queue in queues]
    if not deployments:
        log.warning("no enabled deployment uses the queues %s: this worker has nothing to serve", sorted(queues))
    for deployment in deployments:
        load_deployment(deployment)
    close_old_connections()


@celeryd_after_setup.connect
def _load_models(sender, instance, conf, **kwargs):
    """Load every deployment on this worker's queues before it takes its first task."""
    global HOSTNAME
    HOSTNAME = sender
    from workers import metrics

    metrics.start()  # before the models load, so their load state shows
    queues = set(instance.app.amqp.queues.consume_from or instance.app.amqp.queues)
    QUEUES.update(queues)
    load_for_queues(queues)
    from workers import heartbeat

    heartbeat.start(hostname=HOSTNAME, queues=sorted(queues))
    from workers import orphans

    orphans.start_sweeper()  # rows a dead worker left running, where no web process saw it die
    from workers import admission

    admission.start(queues)  # fair turns: this worker takes waiting requests only when it has room
    from workers import reload

    reload.start(queues)  # deployments changed in the admin are loaded again
    from django.conf import settings

    if settings.EMBEDDING_QUEUE in queues:
        from workers import ingestion
        from workers.embeddings import model

        model()
        ingestion.start_sweeper()


@task_received.connect
def _tell_received(sender=None, request=None, **kwargs):
    """A generation this worker holds but has not started is watched too: should the worker die
    before starting it, its client gets the error at once instead of waiting for silence to end."""
    if request is None or request.name != "workers.generate":
        return
    from chat import events
    from llmsite import contract

    try:
        events.publish(request.id, contract.Received(worker=HOSTNAME), ride_out=False)  # (on the consumer thread: never waits)
    except Exception:  # Redis away: the stream's own timeout still ends it
        log.warning("could not announce the received request %s", request.id, exc_info=True)


@worker_shutdown.connect
def _shut_down(**kwargs):
    """The stopping worker's running answers end first; then engines that run processes of their
    own (vLLM's) stop them, even where the drain failed. One receiver, so that the order holds:
    Celery runs a signal's receivers in the order they connected."""
    from workers import admission

    try:
        admission.drain()
    finally:
        for engine in {id(e): e for e in [*BY_MODEL.values(), *RETIRING.copy().values()]}.values():
            if hasattr(engine, "shut_down"):
                engine.shut_down()
