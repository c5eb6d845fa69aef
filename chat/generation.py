"""The internal request every protocol translates into, and the events that come back."""

from dataclasses import asdict, dataclass, field


@dataclass
class SamplingParams:
    max_new_tokens: int
    temperature: float
    top_k: int
    top_p: float
    do_sample: bool
    use_cache: bool = True
    seed: int | None = None

    @property
    def greedy(self) -> bool:
        return not self.do_sample or self.temperature == 0

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass
class Conversation:
    """What the model is asked: an optional system prompt, earlier turns, the new prompt."""

    prompt: str
    system_prompt: str = ""
    history: list[list[str]] = field(default_factory=list)

    def messages(self) -> list[dict]:
        messages = [{"role": "system", "content": self.system_prompt}] if self.system_prompt else []
        for user, assistant in self.history:
            if not user and not assistant:
                continue  # clients send an empty default pair when they have no history
            messages.append({"role": "user", "content": user})
            messages.append({"role": "assistant", "content": assistant})
        messages.append({"role": "user", "content": self.prompt})
        return messages
