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
GPUs lack it, the old engine closes first. Each load or reload runs in a thread of its own, one per
deployment, and loads one at a time (the loader's lock); an old engine waits for the answers on it
to end without that lock, so that other deployments load, and change, meanwhile."""

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
    start loading those of `queues` enabled since. Loads and reloads run in threads of their own
    (loader.start_load), this one going on to the next change; a drop is done here, once the
    loader's lock is free."""
    from chat.models import Deployment

    rows = {d.name: d for d in Deployment.objects.defer("tokenizer_files") if d.queue in queues}
    for name in set(loader.LOADED_AS):
        row = rows.get(name)
        if loader.load_pending(name):
            continue  # its reload is under way: a change since is seen at the next look
        if row is None or not row.enabled:
            _drop(name, row)
        elif loader.model_key(row) != loader.LOADED_AS.get(name):
            start_reload(row)
    for row in rows.values():
        if row.enabled and row.name not in loader.LOADED_AS and not loader.load_pending(row.name):
            log.info("deployment %s added or enabled: loading it", row.name)
            loader.start_load(row)  # as a first request does, without waiting for it here


def start_reload(deployment):
    """The deployment's reload, in its thread of loads (loader.start_load): the requests for it
    that find no engine (its old one closing first) wait for it."""
    log.info(
        "deployment %s changed (%s): loading it again",
        deployment.name, _change(loader.LOADED_AS.get(deployment.name), loader.model_key(deployment)),
    )
    return loader.start_load(deployment, _reload)


def _reload(deployment) -> None:
    """The deployment's new model in place of its engine (module doc): loaded beside it, or, without
    room for both, once it has closed. Runs in the deployment's thread of loads, from its row as it
    is once the loads before it are done."""
    name = deployment.name
    with loader.lock:  # the old engine keeps answering meanwhile: engine_for reads ENGINES without the lock
        row = _still_wanted(deployment)  # it may have been dropped, or changed again, while this waited
        if row is None:
            return
        if loader.model_key(row) == loader.LOADED_AS.get(name) and (name in loader.ENGINES or name in loader.FAILED):
            return  # changed back: what it has is what its row asks for
        old = loader.ENGINES.get(name)
        close_first = old is not None and not _fits_beside(old, row)
        del old  # no reference left here: its memory is given back before the new model loads
        if close_first:
            log.info("deployment %s: no room for both models; its engine closes first, requests wait for the new one", name)
        elif not _load_beside(row):
            return
        held, before = _take_out(row), set(loader.ENGINES)
    try:
        # without the loader's lock: other deployments load, and this worker drops or reloads them, meanwhile
        _close_when_idle(held)
        with loader.lock:
            row = _still_wanted(row)
            if row is None:
                return
            loader.load_deployment(row)
            taken = sorted(set(loader.ENGINES) - before)
            if _out_of_memory(name) and taken:
                _fail_saying(row, f"while its old model closed, {', '.join(taken)} loaded on {loader.HOSTNAME}")
    finally:
        loader.LOADING.discard(name)


def _still_wanted(deployment):
    """The deployment's row as it is now; None, and the deployment dropped here (its status saying
    so where it was disabled), where it is no longer enabled on this worker's queues."""
    row = loader.still_served(deployment)
    if row is None:
        _drop(deployment.name, deployment)
    return row


def _load_beside(deployment) -> bool:
    """Load the deployment's new model beside its engine, which answers until it is ready; then
    retire that engine. Whether the old engine must close first instead (the load ran out of
    memory, and it can), the deployment's failure undone."""
    name = deployment.name
    old = loader.ENGINES.get(name)
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
                loader.FAILED.pop(name, None)
                old = None  # for the caller to close first: it is still ENGINES[name]
                return True
    finally:
        if name in loader.FAILED:
            loader.ENGINES.pop(name, None)  # requests get the reason, not the old model
        if old is not None and loader.ENGINES.get(name) is not old:
            held, old = [old], None  # the retire thread's, alone: its memory goes when it closes
            _retire(held)
        # else: it failed before any result (the database away): it serves on, and is tried again
    return False


def _take_out(deployment) -> list:
    """The deployment's engine, taken from the requests (which wait for its new model, unless stopped
    meanwhile) to close before its new model loads (no room for both): [it] for _close_when_idle,
    its only holder here. The answers on it run to their end, which the deployment's status says;
    /metrics counts it as loading. Called with the loader's lock held."""
    from chat.models import Deployment

    detail = f"changed: on {loader.HOSTNAME}, the new model loads once the answers on the old one have ended (no room for both)"
    loader.set_status(deployment, Deployment.Status.LOADING, detail)
    loader.LOADING.add(deployment.name)
    loader.LOADED_AS.pop(deployment.name, None)  # should its reload end without a model, refresh loads it as added
    held = [loader.ENGINES.pop(deployment.name)]
    _retiring(held)  # not shared: nothing else loads it again
    return held


def _say_why_beside(deployment, old) -> None:
    """The failure of a new model that ran out of memory beside an old engine that could not close
    first says why that engine stayed."""
    others = sorted(n for n, e in loader.ENGINES.items() if e is old and n != deployment.name)
    why = f"which {', '.join(others)} still use" if others else "as WORKER_RELOAD_MODE 'beside' asks ('auto' closes it first)"
    _fail_saying(deployment, f"loaded beside the old model, {why}")


def _fail_saying(deployment, why: str) -> None:
    """The deployment's failure, with `why` it came to pass, in its status and its requests' errors."""
    from chat.models import Deployment

    loader.FAILED[deployment.name] += f" ({why})"
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


def _retire(held: list) -> None:
    """Close the engine in `held` once the requests on it have finished, in a thread of its own,
    unless a deployment still uses it."""
    if _retiring(held):  # handed over in the list, emptied there: the thread's own arguments would keep it alive
        threading.Thread(target=_close_when_idle, args=(held,), name="engine-retire", daemon=True).start()


def _retiring(held: list) -> bool:
    """Whether the engine in `held` is to close (no deployment uses it): then no deployment of its
    model is given it again, and /metrics counts it as retiring until it has closed."""
    with loader.lock:
        engine = held[0]
        if _shared(engine):
            return False
        for key in [k for k, e in loader.BY_MODEL.items() if e is engine]:
            del loader.BY_MODEL[key]
        loader.RETIRING[id(engine)] = engine
        return True


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
