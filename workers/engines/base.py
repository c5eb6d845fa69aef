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
        """The tokenizer's files, published so the web tier can count tokens without the model."""
        return {}

    def count_tokens(self, text: str) -> int:
        raise NotImplementedError

    def stream(self, prompt: str, params, result: GenerationResult, cancelled: Callable[[], bool]) -> Iterator[str]:
        """Yield text deltas; fill `result` by the end."""
        raise NotImplementedError
