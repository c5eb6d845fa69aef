import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass


def cached_copy(path, suffix: str = ""):
    """Where a converted copy of the model file `path` is kept in the model cache (a de-quantized
    folder, an f16 GGUF, ...): named by the file and keyed by its path, size and mtime."""
    import hashlib
    import os
    from pathlib import Path

    try:
        from django.conf import settings

        cache = Path(settings.MODEL_CACHE_DIR)
    except Exception:  # the engines run without Django settings too (bench/gpu_check.py)
        cache = Path(os.environ.get("LLMSITE_MODEL_CACHE", "var/models"))
    path = Path(path)
    stat = path.stat()
    key = hashlib.sha256(f"{path}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    return cache / f"{path.stem}-{key}{suffix}"


class Pacer:
    """When text held back by Engine.stream may go: at once until `eager_chars` characters went,
    then at most every `interval` seconds, or, with `messages_per_second`, every streams/rate
    seconds where that is longer (streams: the pacers open in this process, one per answer being
    streamed). Every message costs the same CPU on every hop (worker relay, Redis, web tier,
    client) however many tokens it holds: under load this keeps the process's messages per second
    bounded, and the cores for the model. A pacer is open until `close()`."""

    _open = 0
    _lock = threading.Lock()

    def __init__(self, interval: float, eager_chars: int, messages_per_second: float = 0.0):
        self.interval, self.eager_chars, self.rate = interval, eager_chars, messages_per_second
        self.due, self.sent_chars = 0.0, 0
        with Pacer._lock:
            Pacer._open += 1
        self._closed = False

    def close(self) -> None:
        with Pacer._lock:
            if not self._closed:
                Pacer._open -= 1
                self._closed = True

    @property
    def current_interval(self) -> float:
        return max(self.interval, Pacer._open / self.rate) if self.rate > 0 else self.interval

    def wait(self, poll: float, holding: bool) -> float:
        """How long to wait for more output: `poll`, or less when held text falls due sooner."""
        return min(poll, max(0.0, self.due - time.monotonic())) if holding else poll

    def is_due(self) -> bool:
        return time.monotonic() >= self.due

    def went(self, chars: int) -> None:
        self.sent_chars += chars
        self.due = time.monotonic() + self.current_interval if self.sent_chars >= self.eager_chars else 0.0


class LoadError(Exception):
    """The model cannot be loaded; the message is shown to operators and clients."""


@dataclass
class GenerationResult:
    finish_reason: str = ""  # "stop", "length" or "cancelled"
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0  # prompt tokens whose KV rows came from a cache instead of being computed


class Engine:
    """Loads one model and turns a rendered prompt into a stream of text deltas."""

    tokenizer = None
    context_length: int | None = None

    def __init__(self, deployment):
        raise NotImplementedError

    def tokenizer_files(self) -> dict[str, str]:
        """The tokenizer's files, published so the web tier can count tokens without the model
        (written once per engine; deployments sharing the engine reuse them)."""
        if getattr(self, "_tokenizer_files", None) is None:
            import tempfile
            from pathlib import Path

            with tempfile.TemporaryDirectory() as tmp:
                self.tokenizer.save_pretrained(tmp)
                self._tokenizer_files = {p.name: p.read_text() for p in Path(tmp).iterdir() if p.is_file()}
        return self._tokenizer_files

    def count_tokens(self, text: str) -> int:
        from chat.prompting import count_tokens

        return count_tokens(self.tokenizer, text)

    def token_logprobs(self, ids: list[int]) -> list[float]:
        """log p(ids[i] | ids[:i]) for i >= 1 (quality checks; engines that can score text)."""
        raise NotImplementedError

    def perplexity(self, text: str) -> float:
        """The model's perplexity on `text`: how the quality guard compares fast engines with fp32."""
        import math

        logprobs = self.token_logprobs(self.tokenizer(text, add_special_tokens=False)["input_ids"])
        return math.exp(-sum(logprobs) / len(logprobs))

    def stream(
        self,
        prompt: str,
        params,
        result: GenerationResult,
        cancelled: Callable[[], bool],
        interval: float = 0.0,
        eager_chars: int = 1,
        cache_scope: str = "",
        messages_per_second: float = 0.0,
    ) -> Iterator[str]:
        """Yield text deltas; fill `result` by the end. Text goes at once until `eager_chars`
        characters went (what the caller needs before it can show anything, such as a stop-text
        check's hold-back), then at most every `interval` seconds, or less often under load with
        `messages_per_second` (see Pacer): what arrives meanwhile waits and goes as one piece. The last piece (the end, a cancel, a failure) goes at once. Tokens that
        queued up while the caller was busy go as one piece even with no interval. KV cache rows an
        engine keeps (a prompt prefix, earlier turns) are shared only among requests of one
        `cache_scope` (KV_CACHE_SCOPE)."""
        raise NotImplementedError
