"""The conversation every protocol translates its request into (the web tier's side)."""

from dataclasses import dataclass, field


@dataclass
class Conversation:
    """What the model is asked: an optional system prompt, earlier turns, the new prompt."""

    prompt: str
    system_prompt: str = ""
    history: list = field(default_factory=list)
    # A full message list (OpenAI protocol: any order of roles) that replaces the fields above.
    raw_messages: list[dict] | None = None
    tools: list[dict] = field(default_factory=list)  # OpenAI function tools, for the chat template's `tools=`

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
