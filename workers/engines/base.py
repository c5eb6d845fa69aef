import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field


def cpu_has_bf16() -> bool:
    """Whether this CPU has bf16 instructions (AVX-512 BF16 or AMX): where it has none, bf16
    and fp16 run as fp32."""
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            flags = cpuinfo.read()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def family_stops(tokenizer, model_type: str) -> tuple[list[int], list[str]]:
    """The model family's stop strings (chat.chat_formats), split: (the ids of those that are single
    tokens of this vocabulary, the others as text)."""
    from chat.chat_formats import stop_strings

    ids, texts = [], []
    for text in stop_strings(model_type):
        token_id = tokenizer.convert_tokens_to_ids(text)
        if isinstance(token_id, int) and token_id != tokenizer.unk_token_id:
            ids.append(token_id)
        else:
            texts.append(text)
    return ids, texts


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
    then at most every `interval` seconds."""

    def __init__(self, interval: float, eager_chars: int):
        self.interval, self.eager_chars = interval, eager_chars
        self.due, self.sent_chars = 0.0, 0

    def wait(self, poll: float, holding: bool) -> float:
        """How long to wait for more output: `poll`, or less when held text falls due sooner."""
        return min(poll, max(0.0, self.due - time.monotonic())) if holding else poll

    def is_due(self) -> bool:
        return time.monotonic() >= self.due

    def went(self, chars: int) -> None:
        self.sent_chars += chars
        self.due = time.monotonic() + self.interval if self.sent_chars >= self.eager_chars else 0.0


class LoadError(Exception):
    """The model cannot be loaded; the message is shown to operators and clients."""


@dataclass
class GenerationResult:
    finish_reason: str = ""  # "stop", "length" or "cancelled"
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0  # prompt tokens whose KV rows came from a cache instead of being computed
    logprobs: list = field(default_factory=list)  # each generated token's entry, where the request asked (Delta.logprobs)


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

    def prompt_ids(self, prompt: str | list[int]) -> list[int]:
        """The prompt as token ids: given so by the worker (fitted once, chat.prompting.fit_prompt),
        or tokenized here from a rendered text (in-process callers: tests, bench)."""
        if isinstance(prompt, list):
            return prompt
        return self.tokenizer(prompt, add_special_tokens=False)["input_ids"]

    def vocab_width(self) -> int:
        """How many logits a step gives (the model's vocabulary, padding included)."""
        return len(self.tokenizer)

    def count_tokens(self, text: str) -> int:
        return len(self.prompt_ids(text))

    def token_logprobs(self, ids: list[int]) -> list[float]:
        """log p(ids[i] | ids[:i]) for i >= 1 (quality checks; engines that can score text)."""
        raise NotImplementedError

    def close(self, timeout: float) -> bool:
        """Once the requests on it have finished, stop and give back what the engine holds beyond
        its Python objects (threads, native contexts, processes): its deployment was changed or
        disabled (workers/reload.py). Whether it closed within `timeout` seconds (it never cuts
        an answer short; a request that takes it after it closed gets an error at once)."""
        return True

    def room_beside(self, deployment) -> bool:
        """Whether the changed deployment's new model fits beside this engine now: where not, this
        engine closes before the new model loads (workers/reload.py). On CPUs the machine's memory
        is not checked."""
        return True

    def perplexity(self, text: str) -> float:
        """The model's perplexity on `text`: how the quality guard compares fast engines with fp32."""
        import math

        logprobs = self.token_logprobs(self.tokenizer(text, add_special_tokens=False)["input_ids"])
        return math.exp(-sum(logprobs) / len(logprobs))

    def stream(
        self,
        prompt: str | list[int],
        params,
        result: GenerationResult,
        cancelled: Callable[[], bool],
        interval: float = 0.0,
        eager_chars: int = 1,
        cache_scope: str = "",
    ) -> Iterator[str]:
        """Yield text deltas for `prompt` (token ids, or a rendered text); fill `result` by the end.
        The worker fitted max_new_tokens to the deployment's context; an engine caps it to its own
        room per request too. Text goes at once until `eager_chars`
        characters went (what the caller needs before it can show anything, such as a stop-text
        check's hold-back), then at most every `interval` seconds: what arrives meanwhile waits and
        goes as one piece. The last piece (the end, a cancel, a failure) goes at once. Tokens that
        queued up while the caller was busy go as one piece even with no interval. KV cache rows an
        engine keeps (a prompt prefix, earlier turns) are shared only among requests of one
        `cache_scope` (KV_CACHE_SCOPE)."""
        raise NotImplementedError
