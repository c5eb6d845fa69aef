"""Chat completions whose answer may be tool calls: the OpenAI formatters, with the answer's
text turned into `tool_calls` (chat.tool_calls) and `finish_reason: "tool_calls"`. Streamed as
OpenAI streams calls: per call a chunk with its index, id, type and function name, then its
arguments as `function.arguments` deltas; text goes out as content only once it cannot be a call."""

from chat.formatters.openai import OpenAIAnswer, OpenAIStream, sse
from chat.protocols import openai as wire
from chat.protocols.openai_tools import FunctionCallDelta, ToolCallDelta
from chat.tool_calls import HeldText, parse_answer
from chat.tools import ToolPlan
from llmsite import contract


class ToolCallStream(OpenAIStream):
    def __init__(self, shape, plan: ToolPlan, *, include_usage: bool):
        super().__init__(shape, include_usage=include_usage)
        self.plan, self.held = plan, HeldText(plan)

    def on_delta(self, event: contract.Delta) -> list:
        text = self.held.feed(event.text)
        return [sse(self.shape.chunk(text))] if text else []

    def on_final(self, event: contract.Final) -> list:
        content, calls = parse_answer(event.text, self.plan)
        if not calls:
            tail = self.held.unsent
            out = [sse(self.shape.chunk(tail))] if tail else []
            return out + super().on_final(event)
        out = [sse(self._calls_chunk([ToolCallDelta(index=i, id=c.id, type="function", function=FunctionCallDelta(name=c.name, arguments=""))]))
               for i, c in enumerate(calls)]
        out += [sse(self._calls_chunk([ToolCallDelta(index=i, function=FunctionCallDelta(arguments=c.arguments))])) for i, c in enumerate(calls)]
        return out + super().on_final(_as_tool_calls(event))

    def _calls_chunk(self, deltas: list[ToolCallDelta]) -> dict:
        chunk = self.shape.chunk(None)
        chunk["choices"][0]["delta"] = {"tool_calls": [d.model_dump(exclude_none=True) for d in deltas]}  # as wire.Delta's
        return chunk


class ToolCallAnswer(OpenAIAnswer):
    def __init__(self, shape, plan: ToolPlan):
        super().__init__(shape)
        self.plan = plan

    def on_final(self, event: contract.Final) -> list:
        content, calls = parse_answer(event.text, self.plan)
        if not calls:
            return super().on_final(event)
        answer = self.shape.answer(_as_tool_calls(event), self.sources)
        choice = answer.choices[0]
        choice.message = wire.AssistantMessage(content=content, tool_calls=[c.wire() for c in calls])
        return [answer]


def whole_answer(shape, body) -> OpenAIAnswer:
    """Chat completions' whole-answer formatter for `body`, reading tool calls out of the answer
    where tools are in play (the Responses API builds its output items from it too)."""
    plan = getattr(body, "tool_plan", None)
    return ToolCallAnswer(shape, plan) if plan and plan.active else OpenAIAnswer(shape)


def _as_tool_calls(final: contract.Final) -> contract.Final:
    """The final event as the formatters' finish: a complete answer of calls ends "tool_calls"."""
    return contract.Final(final.text, "tool_calls", final.usage, final.cached_tokens, final.logprobs, final.choices)
