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
    stop: list[str] = field(default_factory=list)  # the answer ends before the first of these

    @property
    def greedy(self) -> bool:
        return not self.do_sample or self.temperature == 0

    def as_dict(self) -> dict:
        return asdict(self)


class StopText:
    """Cuts a streamed answer before the first stop sequence, holding back text that may start one."""

    def __init__(self, stops: list[str] | None):
        self.stops = [s for s in stops or [] if s]
        self.hold = max((len(s) for s in self.stops), default=1) - 1
        self.text = ""  # the whole answer so far, stop sequence excluded once hit
        self.sent = 0
        self.hit = False

    def feed(self, delta: str) -> str:
        """The new text that is safe to send after `delta` arrived."""
        if self.hit:
            return ""
        self.text += delta
        cuts = [i for i in (self.text.find(s, max(0, self.sent - len(s))) for s in self.stops) if i >= 0]
        if cuts:
            self.hit = True
            self.text = self.text[: min(cuts)]
            ready = len(self.text)
        else:
            ready = max(self.sent, len(self.text) - self.hold)
        out, self.sent = self.text[self.sent : ready], ready
        return out

    def flush(self) -> str:
        """What was held back, once the answer ended without a stop sequence."""
        out, self.sent = self.text[self.sent :], len(self.text)
        return out


@dataclass
class Conversation:
    """What the model is asked: an optional system prompt, earlier turns, the new prompt."""

    prompt: str
    system_prompt: str = ""
    history: list = field(default_factory=list)
    # A full message list (OpenAI protocol: any order of roles) that replaces the fields above.
    raw_messages: list[dict] | None = None

    def messages(self) -> list[dict]:
        if self.raw_messages is not None:
            return self.raw_messages
        messages = [{"role": "system", "content": self.system_prompt}] if self.system_prompt else []
        for user, assistant in self.history:
            if not user and not assistant:
                continue  # clients send an empty default pair when they have no history
            messages.append({"role": "user", "content": user})
            messages.append({"role": "assistant", "content": assistant})
        messages.append({"role": "user", "content": self.prompt})
        return messages
