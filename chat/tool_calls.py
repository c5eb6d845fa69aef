"""An answer's text turned back into OpenAI's `tool_calls`: what the constrained modes made the
model write (JSON), or a family's own call format in `auto` (Qwen2/2.5's `<tool_call>` blocks,
Llama-3.1's JSON, Mistral's `[TOOL_CALLS]`); and how much of a streamed answer may go out as
text before it is clear whether it is a call."""

import json
import re
import uuid
from dataclasses import dataclass

from chat.protocols.openai_tools import FunctionCall, ToolCall
from chat.tools import ToolPlan

_decoder = json.JSONDecoder()

# Where a family's calls start in its answer (auto): text before this goes out as content.
MARKERS = {"hermes": "<tool_call>", "mistral": "[TOOL_CALLS]", "llama3": "{"}


@dataclass
class Call:
    name: str
    arguments: str  # a JSON text
    id: str = ""

    def __post_init__(self):
        self.id = self.id or f"call_{uuid.uuid4().hex[:24]}"

    def wire(self) -> ToolCall:
        return ToolCall(id=self.id, function=FunctionCall(name=self.name, arguments=self.arguments))


def parse_answer(text: str, plan: ToolPlan) -> tuple[str | None, list[Call]]:
    """(content, calls) of an answer; no calls where the text holds none (it is then all content)."""
    if plan.mode == "named":
        arguments = _json_prefix(text.strip())
        return (None, [Call(plan.named, json.dumps(arguments, ensure_ascii=False))]) if isinstance(arguments, dict) else (text, [])
    if plan.mode == "required":
        calls = _known(_json_prefix(text.strip()), plan, "arguments")
        return (None, calls) if calls else (text, [])
    if plan.mode == "auto":
        return _parse_family(text, plan)
    return text, []


def _parse_family(text: str, plan: ToolPlan) -> tuple[str | None, list[Call]]:
    if plan.syntax == "hermes":
        start = text.find("<tool_call>")
        if start < 0:
            return text, []
        blocks = re.findall(r"<tool_call>\s*(.*?)\s*(?:</tool_call>|$)", text[start:], flags=re.S)
        calls = _known([_json_prefix(b) for b in blocks], plan, "arguments")
        return (text[:start].strip() or None, calls) if calls else (text, [])
    if plan.syntax == "mistral":
        start = text.find("[TOOL_CALLS]")
        if start < 0:
            return text, []
        calls = _known(_json_prefix(text[start + len("[TOOL_CALLS]") :].strip()), plan, "arguments")
        return (text[:start].strip() or None, calls) if calls else (text, [])
    if plan.syntax == "llama3":
        body = text.strip().removeprefix("<|python_tag|>")
        calls = _known([_json_prefix(part.strip()) for part in body.split(";")], plan, "parameters")
        return (None, calls) if calls else (text, [])
    return text, []


def _json_prefix(text: str):
    """The JSON value the text starts with (anything after it ignored), or None."""
    try:
        return _decoder.raw_decode(text)[0]
    except ValueError:
        return None


def _known(items, plan: ToolPlan, arguments_key: str) -> list[Call]:
    """Calls of the plan's tools from [{"name", arguments_key}] ([] if any item is not one)."""
    items = items if isinstance(items, list) else [items]
    calls = []
    for item in items:
        if not isinstance(item, dict) or item.get("name") not in plan.names:
            return []
        arguments = item.get(arguments_key, item.get("arguments", {}))
        if isinstance(arguments, str):  # some families write the arguments as a JSON text
            arguments = _json_prefix(arguments)
        if not isinstance(arguments, dict):
            return []
        calls.append(Call(item["name"], json.dumps(arguments, ensure_ascii=False)))
    return calls


class HeldText:
    """A streamed answer that may turn out to be a call: text goes out as content up to where a
    call could begin, and what follows is held for `parse_answer` at the end."""

    def __init__(self, plan: ToolPlan):
        self.marker = MARKERS.get(plan.syntax, "") if plan.mode == "auto" else ""
        self.holding = plan.mode in ("required", "named")  # constrained: the whole answer is calls
        self.plain = not self.holding and not self.marker
        self.text = ""
        self.sent = 0

    def feed(self, delta: str) -> str:
        """The new text that is safe to send as content."""
        self.text += delta
        if self.plain:
            return self._release(len(self.text))
        if self.holding or not self.text.strip():
            return ""
        if self.marker == "{":  # Llama-3.1 writes a call as the whole answer, nothing before it
            self.holding = self.text.lstrip().startswith(("{", "<|python_tag|>"))
            self.plain = not self.holding
            return self.feed("")
        found = self.text.find(self.marker)
        if found >= 0:
            self.holding = True
            return self._release(found)
        return self._release(self._safe_end())

    def _safe_end(self) -> int:
        """How far the text cannot be the start of the marker."""
        for keep in range(min(len(self.marker) - 1, len(self.text)), 0, -1):
            if self.marker.startswith(self.text[-keep:]):
                return len(self.text) - keep
        return len(self.text)

    def _release(self, end: int) -> str:
        out, self.sent = self.text[self.sent : end], max(self.sent, end)
        return out

    @property
    def unsent(self) -> str:
        return self.text[self.sent :]
