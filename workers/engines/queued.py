"""What the engines with a scheduler thread of their own share: a request goes into the scheduler,
its tokens come back on a queue and are turned into text pieces here, and a cancelled request is
aborted so its batch slot frees at the next step."""

import queue
import time
import uuid

from workers.engines.base import Engine, GenerationResult, Pacer
from workers.engines.sampling import build_policy, logprob_entry
from workers.engines.scheduling import BatchRequest, EngineClosed

CANCEL_POLL_SECONDS = 0.1  # how often a waiting request looks at its cancel flag


class QueuedEngine(Engine):
    """Subclasses set `tokenizer`, `context_length`, `stop_ids` and `scheduler` (submit/abort)."""

    scheduler = None
    stop_ids: frozenset = frozenset()

    def close(self, timeout: float) -> bool:
        return self.scheduler.retire(timeout)

    def _request(self, prompt_ids: list[int], params, cache_scope: str) -> BatchRequest:
        max_new = params.max_new_tokens
        if self.context_length:  # the engine's own room per request (the worker fitted the deployment's)
            max_new = min(max_new, self.context_length - len(prompt_ids))
        return BatchRequest(
            id=uuid.uuid4().hex,
            prompt_ids=prompt_ids,
            max_new_tokens=max_new,
            greedy=params.greedy,
            temperature=params.temperature,
            top_k=params.top_k,
            top_p=params.top_p,
            seed=params.seed,
            stop_ids=self.stop_ids,
            cache_scope=cache_scope,
            policy=build_policy(self, params, prompt_ids),
        )

    def stream(self, prompt, params, result: GenerationResult, cancelled, interval: float = 0.0, eager_chars: int = 1, cache_scope: str = ""):
        """Submit to the scheduler; yield text as tokens arrive; abort when cancelled; text paced
        by `interval` and `eager_chars`, kept KV rows shared within `cache_scope`, as Engine.stream says."""
        request = self._request(self.prompt_ids(prompt), params, cache_scope)
        result.prompt_tokens = len(request.prompt_ids)
        self.scheduler.submit(request)
        detok = IncrementalDecoder(self.tokenizer)
        last_check = time.monotonic()
        held: list[str] = []  # text not yet yielded (it waits for the pacer)
        pacer = Pacer(interval, eager_chars)
        try:
            while True:
                try:
                    kind, value = request.out.get(timeout=pacer.wait(CANCEL_POLL_SECONDS, bool(held)))
                except queue.Empty:
                    kind = None
                if time.monotonic() - last_check >= CANCEL_POLL_SECONDS or (kind is None and not held):
                    last_check = time.monotonic()
                    if cancelled():
                        self.scheduler.abort(request.id)
                # The tokens that arrived meanwhile go out as one piece of text: a consumer
                # that falls behind (many streams on few cores) catches up in fewer messages.
                while kind == "token":
                    result.completion_tokens += 1
                    held.append(detok.add(value))
                    if request.policy is not None and request.policy.logprobs:
                        result.logprobs.append(logprob_entry(self, request.policy.entries[result.completion_tokens - 1]))
                    try:
                        kind, value = request.out.get_nowait()
                    except queue.Empty:
                        kind = None
                if kind == "done":
                    if value == "stop":
                        result.completion_tokens += 1  # the end-of-turn token was generated too
                    result.finish_reason = "stop" if value == "grammar" else value
                    text = "".join(held) + detok.flush()
                    if text:
                        yield text
                    return
                elif kind == "error":
                    if text := "".join(held):
                        yield text  # what was generated before the failure is kept
                    raise RuntimeError(value)
                elif kind == "closed":
                    raise EngineClosed()
                if held and pacer.is_due():
                    text = "".join(held)
                    held.clear()
                    if text:
                        pacer.went(len(text))
                        yield text
        finally:
            result.cached_tokens = request.cached_tokens  # also when the consumer stopped early (a stop string)
            if not result.finish_reason:  # the consumer stopped early: free the slot
                self.scheduler.abort(request.id)


class IncrementalDecoder:
    """Turns token ids into text pieces without splitting a multi-byte character.

    Decodes only a short window (the tokens since the last piece, plus the ones before them for
    context, as vLLM and transformers' TextStreamer do), so a long answer costs O(1) per token.
    """

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.prefix_offset = 0  # window start: decoded again only as context for spacing
        self.read_offset = 0  # tokens before this were already sent

    def _decode(self, start: int, end: int | None = None) -> str:
        return self.tokenizer.decode(self.ids[start:end], skip_special_tokens=True)

    def add(self, token: int) -> str:
        self.ids.append(token)
        prefix = self._decode(self.prefix_offset, self.read_offset)
        text = self._decode(self.prefix_offset)
        if len(text) <= len(prefix) or text.endswith("\ufffd"):
            return ""  # nothing new yet, or an incomplete character: wait for the next token
        self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
        return text[len(prefix) :]

    def flush(self) -> str:
        prefix = self._decode(self.prefix_offset, self.read_offset)
        text = self._decode(self.prefix_offset)
        self.prefix_offset = self.read_offset = len(self.ids)
        return text[len(prefix) :] if len(text) > len(prefix) else ""
