"""Running one generation on the worker: claim it, fit its prompt, stream it, record its end.

Every step publishes typed events (llmsite.contract) on the request's stream and changes the
request's row only through chat.lifecycle.
"""

import dataclasses
import functools
import logging
import time

from django.conf import settings
from django.db import Error as DBError, close_old_connections
from django.utils import timezone

from chat import events, lifecycle
from chat.chat_formats import stop_strings
from chat.models import Deployment
from chat.prompting import files_digest, fit_prompt
from chat.services import release_connection
from llmsite import contract, redis_outage
from llmsite.contract import ContractError, GenerationRequest, PromptFormat, StopText
from llmsite.errors import ContextTooLong, outage
from workers import heartbeat, loader, metrics, retrieval, unstored
from workers.answers import Answer, kept_logprobs, unsent_logprobs
from workers.engines import GenerationResult
from workers.engines.sampling import PolicyError
from workers.engines.scheduling import EngineClosed

log = logging.getLogger(__name__)

KEEP_ALIVE_SECONDS = 10.0  # as often as workers/admission.py tells a waiting request its place
LOADING_NOTICE_SECONDS = 1.0  # a wait for the model's load longer than this is told at once


class GenerationFailed(Exception):
    """Ends a generation with an error event (the message is the client's)."""

    def __init__(self, message: str, kind: str = "server_error", param: str | None = None):
        super().__init__(message)
        self.event = contract.Error(message, kind=kind, param=param)


def generate(wire: dict) -> None:
    """The task's entry: validate the request, then run it; a request that breaks the contract
    ends its stream with an error event instead of crashing the worker."""
    try:
        request = GenerationRequest.from_wire(wire)
    except ContractError as exc:
        request_id = wire.get("request_id")
        log.error("generation %s refused: %s", request_id, exc)
        deployment = wire.get("deployment")
        metrics.count(deployment=deployment if isinstance(deployment, str) else "", outcome="error")
        if isinstance(request_id, str):
            _end_failed(request_id, GenerationFailed(f"The worker cannot take this request: {exc}"))
        return
    run_generation(request)


def run_generation(request: GenerationRequest) -> None:
    close_old_connections()
    if not _claim(request.request_id, request.deployment):
        return
    timing = metrics.Timing(request)
    with events.cancel_watcher.watching(request.request_id) as cancel:  # Stop and a client gone reach the engine
        log.info("generation %s started", request.request_id)
        answers = [Answer(index=i) for i in range(max(1, request.sampling.n))]
        answer = answers[0]
        try:
            events.publish(request.request_id, contract.Start(worker=loader.HOSTNAME))
            _answer(request, answers, cancel, timing)
        except (GenerationFailed, PolicyError) as exc:
            if isinstance(exc, PolicyError):  # decoding fields the engine cannot take (a grammar that does not build)
                exc = GenerationFailed(str(exc), kind="invalid_request", param=exc.param)
            _end_failed(request.request_id, exc, timing=timing, result=answer.result)
            return
        except Exception as exc:
            if isinstance(exc, redis_outage.AWAY):  # away longer than REDIS_OUTAGE_SECONDS: its text names Redis's address
                failure = GenerationFailed(outage(f"Generation {request.request_id} failed: Redis is unavailable", exc, trace=True))
            else:
                log.exception("generation %s failed", request.request_id)
                failure = GenerationFailed(f"Generation failed: {exc}")
            _end_failed(
                request.request_id, failure, timing=timing, result=answer.result, response=answer.stopper.text, first_token_at=answer.first_token_at
            )
            return
        _end_finished(request, answers, timing)


def _answer(request: GenerationRequest, answers: list[Answer], cancel, timing: metrics.Timing) -> None:
    """Fit the prompt for the deployment's engine and stream the answers from it. An engine closed
    in the instant after the request took it (its deployment changed: workers/reload.py) generated
    nothing: the request goes to the engine that replaced it, with its prompt fitted afresh."""
    for attempt in range(2):
        try:
            target, engine = _engine(request, cancel.is_set)
        except loader.WaitCancelled:  # stopped while its model loaded: nothing generated
            log.info("generation %s stopped while it waited for its model", request.request_id)
            for each in answers:
                each.result.finish_reason = "cancelled"
            return
        except loader.StillLoading:  # the load goes on, for the requests after it
            where = f"on {loader.HOSTNAME} " if loader.HOSTNAME else ""
            wait = f"{settings.WORKER_LOAD_WAIT_SECONDS:g} s"
            raise GenerationFailed(f"The model of '{request.deployment}' is still loading {where}after {wait}: try again later.") from None
        prompt_ids = _fit(request, target, engine)
        release_connection()  # back to the pool while the answer streams; the end takes one again
        for each in answers:
            each.stopper = StopText([*request.sampling.stop, *stop_strings(target.model_type)])
        try:
            _stream(request, engine, prompt_ids, answers, cancel, timing)
            return
        except EngineClosed:
            if attempt or any(a.first_token_at is not None for a in answers):
                raise
            log.info("generation %s: its engine closed as it started (a reload); on to the new one", request.request_id)
            engine = prompt_ids = None  # nothing here holds the closed engine while the new one loads
            for each in answers:  # an answer of n that ended empty on the closed engine starts again too
                each.result, each.logprobs_sent = GenerationResult(), 0


def _claim(request_id: str, deployment: str) -> bool:
    """Take a queued request for this worker, once: a second delivery of its task (a broker's
    visibility timeout, a restored message after a worker died) finds it taken and does nothing.
    A request cancelled while it waited (the client left, or pressed Stop) is dropped before any
    model work (counted as stopped), and its stream still ends, so a listener waiting for the end hears it."""
    if events.is_cancelled(request_id):
        lifecycle.cancel_queued(request_id)
    if lifecycle.start(request_id, worker=loader.HOSTNAME, run=heartbeat.RUN):
        return True
    status = lifecycle.status_of(request_id)
    log.warning("generation %s not run: its request is already %s", request_id, status)
    if status == lifecycle.Status.CANCELLED:
        metrics.count(deployment=deployment, outcome="stopped")
        events.publish(request_id, contract.Final(text="", finish_reason="cancelled"))
    return False


def _engine(request: GenerationRequest, cancelled):
    waiting = _keep_alive(request.request_id)
    target = _prompt_target(request.deployment, request.prompt_format)
    engine = loader.engine_for(target, cancelled, waiting) if target is not None else None
    if engine is None and target is not None and target.pk is None:  # unloaded since (a reload replacing it): as a first load
        target = _prompt_target(request.deployment, None)
        engine = loader.engine_for(target, cancelled, waiting) if target is not None else None
    if engine is None:
        current = Deployment.objects.filter(name=request.deployment).only("enabled").first()  # disabled while it waited?
        reason = loader.FAILED.get(request.deployment) or (
            f"the deployment '{request.deployment}' is disabled" if current is not None and not current.enabled
            else f"this worker does not serve the deployment '{request.deployment}'"
        )  # fmt: skip
        raise GenerationFailed(f"The model is not available: {reason}")
    return target, engine


def _keep_alive(request_id: str):
    """What a request waiting for its model's load calls: after LOADING_NOTICE_SECONDS, then every
    KEEP_ALIVE_SECONDS (or a quarter of STREAM_TIMEOUT_SECONDS, where less), a `received` on its
    stream saying how long it has waited. A wait of minutes is then not taken for a silent worker,
    the request keeps its in-flight slot, and the chat page shows that the model is loading."""
    every = min(KEEP_ALIVE_SECONDS, settings.STREAM_TIMEOUT_SECONDS / 4)
    started = time.monotonic()
    due = started + min(LOADING_NOTICE_SECONDS, every)

    def waiting() -> None:
        nonlocal due
        now = time.monotonic()
        if now < due:
            return
        try:
            events.publish(request_id, contract.Received(worker=loader.HOSTNAME, loading_seconds=round(now - started, 1)))
        except Exception:  # Redis away for a moment: tried again in a second
            log.warning("generation %s: could not say it waits for its model", request_id, exc_info=True)
            due = time.monotonic() + 1.0
            return
        due = time.monotonic() + every

    return waiting


def _prompt_target(name: str, prompt_format: PromptFormat | dict | None) -> Deployment | None:
    """The deployment as far as this request needs it. When its engine is loaded here already: an
    unsaved Deployment holding only its name and the prompt format the web tier read for the
    request (no query); else its row (a first load)."""
    if isinstance(prompt_format, dict):
        prompt_format = PromptFormat(**prompt_format)
    if prompt_format is not None and loader.is_loaded(name):
        return Deployment(
            name=name,
            model_type=prompt_format.model_type,
            chat_template=prompt_format.chat_template,
            context_length=prompt_format.context_length,
        )
    # Without its tokenizer files: megabytes of JSON, read and parsed for nothing on every request.
    return Deployment.objects.defer("tokenizer_files").filter(name=name).first()


def _fit(request: GenerationRequest, target: Deployment, engine) -> list[int]:
    """The prompt's token ids: as the web tier counted them with this engine's tokenizer files,
    else fitted here (no tokenizer in the web tier yet, one of an earlier model of the deployment,
    or knowledge-base sources added to the messages)."""
    if request.prompt_ids is not None:
        if request.tokenizer_digest == _files_digest(engine):
            return request.prompt_ids
        log.info("generation %s refits its prompt: counted with other tokenizer files", request.request_id)
    fmt = PromptFormat(target.model_type, target.chat_template, target.context_length or engine.context_length)
    messages = request.messages
    try:
        if request.knowledge_base is not None:
            messages = _ground(request, engine, fmt)
        return fit_prompt(engine.tokenizer, messages, fmt, request.sampling, tools=request.tools)
    except ContextTooLong as exc:
        raise GenerationFailed(exc.message, kind="invalid_request", param=exc.param) from None


def _files_digest(engine) -> str:
    """The digest of the tokenizer files this engine published (as the web tier computes it)."""
    digest = getattr(engine, "_files_digest", None)
    if digest is None:
        digest = engine._files_digest = files_digest(engine.tokenizer_files())
    return digest


def _ground(request: GenerationRequest, engine, fmt: PromptFormat) -> list[dict]:
    """The messages with the knowledge base's best chunks added, as many as the context holds."""
    room = min(request.sampling.max_new_tokens, retrieval.ANSWER_ROOM_TOKENS)

    def fits(candidate: list[dict]) -> bool:
        if not fmt.context_length:
            return True
        trial = PromptFormat(fmt.model_type, fmt.chat_template, None)
        return len(fit_prompt(engine.tokenizer, candidate, trial, request.sampling, tools=request.tools)) + room < fmt.context_length

    return retrieval.ground(request_id=request.request_id, knowledge_base_id=request.knowledge_base, messages=request.messages, fits=fits)


def _stream(request: GenerationRequest, engine, prompt_ids: list[int], answers: list[Answer], cancel, timing: metrics.Timing) -> None:
    """Stream the answers' text as delta events: each answer is its own engine request (for n > 1,
    seeds seed, seed + 1, ... where the request names one), and their pieces are taken in turn."""
    # Pieces go at once until the stop-text check can show something, then every STREAM_INTERVAL_MS.
    pacing = {"interval": settings.STREAM_INTERVAL_MS / 1000, "eager_chars": answers[0].stopper.hold + 1}
    streams = [
        (answer, engine.stream(prompt_ids, _answer_params(request.sampling, answer.index), answer.result, cancel.is_set,
                               cache_scope=request.cache_scope, **pacing))
        for answer in answers
    ]
    live = list(streams)
    try:
        while live:
            for item in list(live):
                answer, pieces = item
                delta = next(pieces, None)
                if delta is None or _publish(request, answer, delta, timing):
                    live.remove(item)
                    pieces.close()  # an answer cut at a stop string: its engine request is aborted
    finally:
        for _, pieces in streams:
            pieces.close()
    for answer in answers:
        tail = "" if answer.stopper.hit else answer.stopper.flush()
        logprobs = unsent_logprobs(request, answer)
        if tail or logprobs:
            events.publish(request.request_id, contract.Delta(tail, index=answer.index, logprobs=logprobs))


def _answer_params(sampling: contract.SamplingParams, index: int) -> contract.SamplingParams:
    """Answer `index`'s sampling settings: the request's, with seed + index where it names a seed."""
    if index == 0 or sampling.seed is None:
        return sampling
    return dataclasses.replace(sampling, seed=sampling.seed + index)


def _publish(request: GenerationRequest, answer: Answer, delta: str, timing: metrics.Timing) -> bool:
    """Publish what of `delta` is safe to show; True when the answer hit a stop string."""
    if answer.first_token_at is None:
        answer.first_token_at = timezone.now()
        if answer.index == 0:
            timing.first()
    # A NUL character (a byte-level token that models can emit) cannot be stored in
    # PostgreSQL text and means nothing in an answer: drop it before anything keeps it.
    ready = answer.stopper.feed(delta.replace("\x00", ""))
    logprobs = unsent_logprobs(request, answer)
    if ready or logprobs:
        events.publish(request.request_id, contract.Delta(ready, index=answer.index, logprobs=logprobs))
    return answer.stopper.hit


def _end_finished(request: GenerationRequest, answers: list[Answer], timing: metrics.Timing) -> None:
    for answer in answers:
        if answer.stopper.hit:
            answer.result.finish_reason = "stop"  # the engine stopped because a stop sequence appeared
    first, request_id = answers[0], request.request_id
    result = dataclasses.replace(first.result, completion_tokens=sum(a.result.completion_tokens for a in answers))
    timing.end(result, outcome="stopped" if result.finish_reason == "cancelled" else "finished")
    usage = {"prompt_tokens": result.prompt_tokens, "completion_tokens": result.completion_tokens}
    logprobs = kept_logprobs if request.sampling.logprobs else (lambda answer: None)
    choices = [
        {"index": a.index, "text": a.stopper.text, "finish_reason": a.result.finish_reason, "logprobs": logprobs(a)} for a in answers
    ]
    final = contract.Final(
        text=first.stopper.text, finish_reason=result.finish_reason, usage=usage, cached_tokens=result.cached_tokens,
        logprobs=logprobs(first), choices=choices if len(answers) > 1 else None,
    )
    _end(
        request_id,
        final,
        lambda ended: lifecycle.finish(
            request_id,
            finished_at=ended,
            response=first.stopper.text,
            finish_reason=result.finish_reason,
            first_token_at=first.first_token_at,
            cached_tokens=result.cached_tokens,
            **usage,
        ),
    )


def end_broken(request_id: str, exc: Exception) -> None:
    """A generation that raised outside its own handling (the database gone at its claim): the row
    failed and the stream ended with an error event."""
    _end_failed(request_id, GenerationFailed(f"The worker failed on this request: {exc}"))


def _end_failed(request_id: str, failure: GenerationFailed, *, timing: metrics.Timing | None = None, result=None, **fields) -> None:
    if timing is not None:  # a refusal the worker found (a prompt over the context) is counted as one
        refused = failure.event.kind == "invalid_request"
        timing.end(result or GenerationResult(), outcome="rejected" if refused else "error", reason="invalid_request" if refused else "")
    _end(request_id, failure.event, lambda ended: lifecycle.fail(request_id, failure.event.message, finished_at=ended, **fields))


def _end(request_id: str, event: contract.Event, store) -> None:
    """Store how the request ended (`store(finished_at)`), then end its stream with `event`: the
    client hears the end even when the database cannot take the record (PostgreSQL gone
    mid-answer: logged, and stored once it is back, workers/unstored.py)."""
    store = functools.partial(store, timezone.now())
    try:
        store()
    except DBError as exc:  # InterfaceError (a closed connection) as well as DatabaseError
        kept = unstored.keep(request_id, store, exc)
        log.exception("generation %s: its end could not be stored%s", request_id, " (kept to store once the database is back)" if kept else "")
    events.publish(request_id, event)


def run_embedding(*, request_id: str, texts: list[str]) -> None:
    from workers.embeddings import embed_texts

    try:
        vectors, tokens = embed_texts(texts)
    except Exception as exc:
        log.exception("embedding %s failed", request_id)
        events.publish(request_id, contract.Error(f"Embedding failed: {exc}"))
        return
    events.publish(request_id, contract.Embeddings(vectors=vectors, tokens=tokens))
