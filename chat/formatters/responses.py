"""The Responses API's stream (`/v1/responses` with `stream: true`): server-sent events, each
with its `type` and `sequence_number`, in the order of OpenAI's reference:

response.created, response.in_progress, then per output item response.output_item.added,
(a message) response.content_part.added, response.output_text.delta..., response.output_text.done,
response.content_part.done, (a function call) response.function_call_arguments.delta/.done, then
response.output_item.done; last response.completed (or .incomplete, or .failed).

The answer's items come from chat completions' whole-answer formatter (chat/formatters/openai.py),
fed the same events: tool calls read out of an answer there are function_call items here.
"""

import json

from chat.formatters.openai import OpenAIAnswer
from chat.relay import Formatter
from chat.responses import Draft
from llmsite import contract

FINISHED = object()  # the answer ended: the view stores it, then sends `end()`


class ResponsesStream(Formatter):
    """With `whole_text` (a request with tools: a call is known only once the answer ends) the
    message's text goes out as one delta at the end; otherwise piece by piece."""

    def __init__(self, draft: Draft, shape, chat: OpenAIAnswer, *, whole_text: bool):
        self.draft, self.whole_text = draft, whole_text
        self.chat = chat  # the answer as chat completions gives it (formatters.tool_calls.whole_answer)
        self.message_id = f"msg_{draft.item_id}"
        self.sequence = 0
        self.opened = False  # the message item was announced

    def event(self, kind: str, **fields) -> str:
        data = {"type": kind, "sequence_number": self.sequence, **fields}
        self.sequence += 1
        return f"event: {kind}\ndata: {json.dumps(data, ensure_ascii=False)}\n\n"

    def begin(self) -> list:
        out = [self.event("response.created", response=self.draft.object())]
        out.append(self.event("response.in_progress", response=self.draft.object()))
        return out if self.whole_text else [*out, *self._open_message(0)]

    def _open_message(self, index: int) -> list:
        self.opened = True
        item = {"type": "message", "id": self.message_id, "role": "assistant", "status": "in_progress", "content": []}
        part = {"type": "output_text", "text": "", "annotations": []}
        where = {"item_id": self.message_id, "output_index": index, "content_index": 0}
        return [
            self.event("response.output_item.added", output_index=index, item=item),
            self.event("response.content_part.added", **where, part=part),
        ]

    def _text(self, text: str, index: int) -> str:
        where = {"item_id": self.message_id, "output_index": index, "content_index": 0}
        return self.event("response.output_text.delta", **where, delta=text, logprobs=[])

    def on_sources(self, event: contract.Sources) -> list:
        return self.chat.on_sources(event)

    def on_delta(self, event: contract.Delta) -> list:
        self.chat.on_delta(event)
        return [self._text(event.text, 0)] if event.text and not self.whole_text else []

    def on_final(self, event: contract.Final) -> list:
        self.draft.finish(self.chat.on_final(event)[0])
        out: list = []
        for index, item in enumerate(self.draft.output):
            out += self._message(item, index) if item["type"] == "message" else self._call(item, index)
        return [*out, FINISHED]

    def on_error(self, event: contract.Error) -> list:
        self.draft.fail(event.message)
        return [FINISHED]

    def _message(self, item: dict, index: int) -> list:
        part = item["content"][0]
        out = [] if self.opened else [*self._open_message(index), *([self._text(part["text"], index)] if part["text"] else [])]
        where = {"item_id": item["id"], "output_index": index, "content_index": 0}
        return [
            *out,
            self.event("response.output_text.done", **where, text=part["text"], logprobs=[]),
            self.event("response.content_part.done", **where, part=part),
            self.event("response.output_item.done", output_index=index, item=item),
        ]

    def _call(self, item: dict, index: int) -> list:
        where = {"item_id": item["id"], "output_index": index}
        return [
            self.event("response.output_item.added", output_index=index, item={**item, "status": "in_progress", "arguments": ""}),
            self.event("response.function_call_arguments.delta", **where, delta=item["arguments"]),
            self.event("response.function_call_arguments.done", **where, arguments=item["arguments"]),
            self.event("response.output_item.done", output_index=index, item=item),
        ]

    def end(self) -> str:
        """The last event, once the response is stored: completed, incomplete or failed."""
        return self.event(f"response.{self.draft.status}", response=self.draft.object())
