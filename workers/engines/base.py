from collections.abc import Callable, Iterator
from dataclasses import dataclass


class LoadError(Exception):
    """The model cannot be loaded; the message is shown to operators and clients."""


@dataclass
class GenerationResult:
    finish_reason: str = ""  # "stop", "length" or "cancelled"
    prompt_tokens: int = 0
    completion_tokens: int = 0


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

    def stream(self, prompt: str, params, result: GenerationResult, cancelled: Callable[[], bool]) -> Iterator[str]:
        """Yield text deltas; fill `result` by the end."""
        raise NotImplementedError
