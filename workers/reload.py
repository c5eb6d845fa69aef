"""Deployments an operator changed after this worker loaded them.

Every WORKER_RELOAD_INTERVAL seconds a thread reads the deployments of the worker's queues. Where
one's model key (engine, model source, precision, model type, remote code, and what its engine is
sized by: batch size, context length) differs from the one its engine was loaded with, the new
engine is loaded beside the old one, which keeps answering until the new one is ready; then
requests go to the new one, and the old one is closed once the requests on it have finished (unless
another deployment shares it). Where the new one cannot load, the deployment is failed with the
reason (its row asks for that model) and the old engine closed the same way. A failed deployment is
tried again once one of those fields changes (a corrected folder, say); a disabled or deleted one
is dropped and its engine closed the same way; a new or re-enabled one is loaded, as the worker's
start loads those it finds. A reload needs room for both copies while the new one loads; where the
GPUs lack it, the old engine closes first."""

import gc
import logging
import re
import threading

from django.conf import settings

from workers import loader
from workers.periodic import every

log = logging.getLogger(__name__)

DRAIN_SECONDS = 600  # how often a replaced engine still running requests says so while it waits for them


def start(queues) -> threading.Thread | None:
    """The thread that looks for changed deployments (none where WORKER_RELOAD_INTERVAL is 0)."""
    if settings.WORKER_RELOAD_INTERVAL <= 0:
        return None
    return every(settings.WORKER_RELOAD_INTERVAL, lambda: refresh(queues), name="deployment-reload", failure="could not look for changed deployments")


def refresh(queues) -> None:
    """Load again, drop or retry each deployment of `queues` this worker holds whose row changed;
    start loading those of `queues` enabled since."""
    from chat.models import Deployment

    rows = {d.name: d for d in Deployment.objects.defer("tokenizer_files") if d.queue in queues}
    for name in set(loader.LOADED_AS):
        row = rows.get(name)
        if row is None or not row.enabled:
            _drop(name, row)
        elif loader.model_key(row) != loader.LOADED_AS.get(name):
            _reload(row)
    for row in rows.values():
        if row.enabled and row.name not in loader.LOADED_AS and not loader.load_pending(row.name):
            log.info("deployment %s added or enabled: loading it", row.name)
            loader.start_load(row)  # as a first request does, without waiting for it here


def _reload(deployment) -> None:
    name = deployment.name
    log.info("deployment %s changed (%s): loading it again", name, _change(loader.LOADED_AS.get(name), loader.model_key(deployment)))
    with loader.lock:  # the old engine keeps answering meanwhile: engine_for reads ENGINES without the lock
        old = loader.ENGINES.get(name)
        if old is not None and not _fits_beside(old, deployment):
            log.info("deployment %s: no room for both models; its engine closes first, requests wait for the new one", name)
            old = None  # no reference left here: its memory is given back before the new model loads
            _close_first(deployment)
        try:
            loader.FAILED.pop(name, None)
            beside = f"changed: loading its new model on {loader.HOSTNAME}; the old one answers until it is ready"
            # ENGINES[name] the new engine, or FAILED[name] the reason
            loader.load_deployment(deployment, beside if old is not None else "")
            if old is not None and _out_of_memory(name):
                if settings.WORKER_RELOAD_MODE != "auto" or _shared(old, name):  # it cannot close first
                    _say_why_beside(deployment, old)
                else:
                    log.warning("deployment %s: its new model found no room beside the old one; the old one closes first", name)
                    old = None
                    _close_first(deployment)
                    loader.FAILED.pop(name, None)
                    loader.load_deployment(deployment)
        finally:
            if name in loader.FAILED:
                loader.ENGINES.pop(name, None)  # requests get the reason, not the old model
            if old is not None and loader.ENGINES.get(name) is not old:
                held, old = [old], None  # the retire thread's, alone: its memory goes when it closes
                _retire(held)
            # else: it failed before any result (the database away): it serves on, and is tried again


def _close_first(deployment) -> None:
    """Close the deployment's engine before its new model loads (no room for both): the answers on
    it run to their end, which its status says; requests for it wait for the new model (their load
    waits on the loader's lock, which the caller holds), unless stopped meanwhile."""
    from chat.models import Deployment

    detail = f"changed: on {loader.HOSTNAME}, the new model loads once the answers on the old one have ended (no room for both)"
    loader.set_status(deployment, Deployment.Status.LOADING, detail)
    _retire([loader.ENGINES.pop(deployment.name)], wait=True)  # held by nothing else here


def _say_why_beside(deployment, old) -> None:
    """The failure of a new model that ran out of memory beside an old engine that could not close
    first says why that engine stayed."""
    from chat.models import Deployment

    others = sorted(n for n, e in loader.ENGINES.items() if e is old and n != deployment.name)
    why = f"which {', '.join(others)} still use" if others else "as WORKER_RELOAD_MODE 'beside' asks ('auto' closes it first)"
    loader.FAILED[deployment.name] += f" (loaded beside the old model, {why})"
    loader.set_status(deployment, Deployment.Status.FAILED, loader.FAILED[deployment.name])


def _out_of_memory(name: str) -> bool:
    """Whether the deployment's load failed for want of memory (the engines' and vLLM's words for it)."""
    return bool(re.search(r"out of memory|free memory|available memory", loader.FAILED.get(name, ""), re.IGNORECASE))


def _drop(name: str, row) -> None:
    from chat.models import Deployment

    with loader.lock:
        loader.LOADED_AS.pop(name, None)
        loader.FAILED.pop(name, None)
        old = loader.ENGINES.pop(name, None)
    if old is not None:
        log.info("deployment %s disabled or deleted: its engine goes", name)
        held, old = [old], None  # the retire thread's, alone: its memory goes when it closes
        _retire(held)
    if row is not None:  # disabled: the admin no longer shows it ready here
        detail = f"disabled: not loaded on {loader.HOSTNAME}"
        Deployment.objects.filter(pk=row.pk, enabled=False).update(status=Deployment.Status.UNKNOWN, status_detail=detail)


def _change(before: tuple | None, after: tuple) -> str:
    before, after = dict(before or ()), dict(after)
    fields = [*after, *(f for f in before if f not in after)]
    return ", ".join(f"{f}: {before.get(f)!r} -> {after.get(f)!r}" for f in fields if before.get(f) != after.get(f))


def _retire(held: list, wait: bool = False) -> None:
    """Close the engine in `held` once the requests on it have finished, unless a deployment still
    uses it: in a thread of its own, or before returning (`wait`: its memory is given back then,
    where the caller keeps no other reference to it)."""
    with loader.lock:
        engine = held[0]
        if _shared(engine):
            return
        for key in [k for k, e in loader.BY_MODEL.items() if e is engine]:
            del loader.BY_MODEL[key]
        loader.RETIRING[id(engine)] = engine
        del engine
    if wait:
        _close_when_idle(held)
    else:  # handed over in the list, emptied there: the thread's own arguments would keep it alive
        threading.Thread(target=_close_when_idle, args=(held,), name="engine-retire", daemon=True).start()


def _shared(engine, name: str | None = None) -> bool:
    """Whether a deployment (other than `name`) uses `engine`."""
    return any(e is engine for n, e in loader.ENGINES.items() if n != name)


def _fits_beside(engine, deployment) -> bool:
    """Whether the deployment's new model loads beside its engine (WORKER_RELOAD_MODE "beside"), or
    the engine closes first ("replace"); "auto": beside where the engine says the new model fits
    (engine.room_beside: the GPUs' free memory). An engine another deployment shares stays for it:
    the new model can only load beside it."""
    if _shared(engine, deployment.name):
        return True
    mode = settings.WORKER_RELOAD_MODE
    if mode != "auto":
        return mode == "beside"
    try:
        return engine.room_beside(deployment)
    except Exception:  # a GPU that cannot say: the safe way round
        log.warning("could not tell whether a second model fits beside the old one: it closes first", exc_info=True)
        return False


def _close_when_idle(held: list) -> None:
    engine, closed = held.pop(), False
    while not closed:  # never an answer cut short: an engine still busy after DRAIN_SECONDS is waited for again
        try:
            closed = engine.close(DRAIN_SECONDS)
        except Exception:
            log.exception("a replaced or dropped engine did not close cleanly")
            break
        if not closed:
            log.warning("a replaced or dropped engine still runs requests after %d s: waiting on", DRAIN_SECONDS)
    loader.RETIRING.pop(id(engine), None)
    del engine
    gc.collect()
    _empty_cuda_cache()
    if closed:
        log.info("a replaced or dropped engine closed")


def _empty_cuda_cache() -> None:
    import sys

    torch = sys.modules.get("torch")  # only where an engine imported it
    if torch is not None and torch.cuda.is_available():
        torch.cuda.empty_cache()
