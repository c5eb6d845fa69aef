"""Running one generation on the worker: events out on the request's stream, the record kept."""

import logging

from django.conf import settings
from django.db import Error as DBError, close_old_connections
from django.utils import timezone

from chat import events
from chat.errors import ContextTooLong
from chat.generation import SamplingParams, StopText
from chat.models import Deployment, RequestLog
from chat.chat_formats import stop_strings
from chat.prompting import render_prompt
from chat.services import PROMPT_FORMAT_FIELDS, release_connection
from workers import loader, retrieval
from workers.engines import GenerationResult

log = logging.getLogger(__name__)


def _update(request_id, **fields):
    RequestLog.objects.filter(id=request_id).update(**fields)


def run_generation(
    *,
    request_id: str,
    deployment: str,
    messages: list[dict],
    params: dict,
    knowledge_base: int | None = None,
    prompt_format: dict | None = None,
    cache_scope: str = "",
) -> None:
    close_old_connections()
    if events.is_cancelled(request_id):
        # The client left (or pressed Stop) while the request waited in the queue: drop it before
        # any model work, and still end its stream so a listener waiting for the end hears it.
        RequestLog.objects.filter(id=request_id, status=RequestLog.Status.QUEUED).update(
            status=RequestLog.Status.CANCELLED, finished_at=timezone.now()
        )
    if not _claim(request_id):
        status = RequestLog.objects.filter(id=request_id).values_list("status", flat=True).first()
        log.warning("generation %s not run: its request is already %s", request_id, status)
        if status == RequestLog.Status.CANCELLED:
            usage = {"prompt_tokens": 0, "completion_tokens": 0}
            events.publish(request_id, {"type": "final", "text": "", "finish_reason": "cancelled", "usage": usage})
        return
    with events.cancel_watcher.watching(request_id):  # Stop and a client gone reach the engine
        log.info("generation %s started", request_id)
        events.publish(request_id, {"type": "start", "worker": loader.HOSTNAME})
        target = _prompt_target(deployment, prompt_format)
        engine = loader.engine_for(target) if target is not None else None
        if engine is None:
            reason = loader.FAILED.get(deployment) or f"this worker does not serve the deployment '{deployment}'"
            _fail(request_id, f"The model is not available: {reason}")
            return

        sampling = SamplingParams(**params)
        result = GenerationResult()
        # The family's stop strings that are not single tokens (those stop the engine) end the text here.
        stopper = StopText([*sampling.stop, *stop_strings(target.model_type)])
        first_token_at = None
        try:
            context = target.context_length or engine.context_length
            if knowledge_base is not None:

                def fits(candidate: list[dict]) -> bool:
                    if not context:
                        return True
                    used = engine.count_tokens(render_prompt(engine.tokenizer, candidate, target.chat_template, target.model_type))
                    return used + min(sampling.max_new_tokens, retrieval.ANSWER_ROOM_TOKENS) < context

                messages = retrieval.ground(request_id=request_id, knowledge_base_id=knowledge_base, messages=messages, fits=fits)
            prompt = render_prompt(engine.tokenizer, messages, target.chat_template, target.model_type)
            if context:
                prompt_tokens = engine.count_tokens(prompt)
                if prompt_tokens >= context:
                    raise ContextTooLong(prompt_tokens=prompt_tokens, context_length=context)
                sampling.max_new_tokens = min(sampling.max_new_tokens, context - prompt_tokens)
            release_connection()  # back to the pool while the answer streams; the end takes one again

            def cancelled() -> bool:
                return stopper.hit or events.cancel_watcher.cancelled(request_id)

            # Pieces go at once until the stop-text check can show something, then every STREAM_INTERVAL_MS.
            pacing = {"interval": settings.STREAM_INTERVAL_MS / 1000, "eager_chars": stopper.hold + 1}
            for delta in engine.stream(prompt, sampling, result, cancelled, cache_scope=cache_scope, **pacing):
                if first_token_at is None:
                    first_token_at = timezone.now()
                # A NUL character (a byte-level token that models can emit) cannot be stored in
                # PostgreSQL text and means nothing in an answer: drop it before anything keeps it.
                ready = stopper.feed(delta.replace("\x00", ""))
                if ready:
                    events.publish(request_id, {"type": "delta", "text": ready})
            if not stopper.hit and (tail := stopper.flush()):
                events.publish(request_id, {"type": "delta", "text": tail})
        except ContextTooLong as exc:
            _fail(request_id, exc.message)
            return
        except Exception as exc:
            log.exception("generation %s failed", request_id)
            _fail(request_id, f"Generation failed: {exc}", response=stopper.text, first_token_at=first_token_at)
            return

        answer = stopper.text
        if stopper.hit:
            result.finish_reason = "stop"  # the engine stopped because a stop sequence appeared
        usage = {"prompt_tokens": result.prompt_tokens, "completion_tokens": result.completion_tokens}
        status = RequestLog.Status.CANCELLED if result.finish_reason == "cancelled" else RequestLog.Status.OK
        final = {"type": "final", "text": answer, "finish_reason": result.finish_reason, "usage": usage, "cached_tokens": result.cached_tokens}
        _end(
            request_id,
            final,
            status=status,
            response=answer,
            finish_reason=result.finish_reason,
            first_token_at=first_token_at,
            finished_at=timezone.now(),
            cached_tokens=result.cached_tokens,
            **usage,
        )


def _prompt_target(name: str, prompt_format: dict | None) -> Deployment | None:
    """The deployment as far as this request needs it. When its engine is loaded here already: an
    unsaved Deployment holding only its name and the prompt format the web tier read for the
    request (no query); else its row (a task queued by an older web tier, or a first load)."""
    if prompt_format is not None and loader.is_loaded(name):
        return Deployment(name=name, **{f: prompt_format[f] for f in PROMPT_FORMAT_FIELDS})
    # Without its tokenizer files: megabytes of JSON, read and parsed for nothing on every request.
    return Deployment.objects.defer("tokenizer_files").filter(name=name).first()


def _claim(request_id) -> bool:
    """Take a queued request for this worker, once: a second delivery of its task (a broker's
    visibility timeout, a restored message after a worker died) finds it taken and does nothing."""
    taken = RequestLog.objects.filter(id=request_id, status=RequestLog.Status.QUEUED).update(
        status=RequestLog.Status.RUNNING, started_at=timezone.now(), worker=loader.HOSTNAME
    )
    return taken == 1


def _fail(request_id, message, **fields):
    _end(request_id, {"type": "error", "message": message}, status=RequestLog.Status.ERROR, error=message, finished_at=timezone.now(), **fields)


def _end(request_id, event: dict, **fields) -> None:
    """Store how the request ended, then end its stream with `event`: the client hears the end
    even when the database cannot take the record (PostgreSQL gone mid-answer; logged)."""
    try:
        _update(request_id, **fields)
    except DBError:  # InterfaceError (a closed connection) as well as DatabaseError
        log.exception("generation %s: its end could not be stored", request_id)
    events.publish(request_id, event)


def run_embedding(*, request_id: str, texts: list[str]) -> None:
    from workers.embeddings import embed_texts

    try:
        vectors, tokens = embed_texts(texts)
    except Exception as exc:
        log.exception("embedding %s failed", request_id)
        events.publish(request_id, {"type": "error", "message": f"Embedding failed: {exc}"})
        return
    events.publish(request_id, {"type": "final", "embeddings": vectors, "usage": {"prompt_tokens": tokens}})
