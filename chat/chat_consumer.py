"""The chat page's WebSocket (session login): one answer at a time, streamed, stoppable.

Client messages: {"type": "send", "conversation": id or null, "deployment", "prompt",
"system_prompt", "temperature", "top_p", "top_k", "repetition_penalty", "max_new_tokens", "knowledge_base"};
{"type": "regenerate", ...the same without prompt}; {"type": "stop"}; {"type": "resume",
"request": id, "last_event": id or "0"} (after a reconnect or a reload). Server messages: "turn"
(the stored rows), "request" (the answer's request id, to resume it), "queued" (position,
wait_seconds: its place in line while it waits), "loading" (worker, seconds: its worker waits
for the model to load, said after a second, then every 10 s), "sources" (the knowledge base's
chunks, before the answer), "delta" (new text), "done" (status ok/cancelled/error and the text),
"error" (nothing was started; "code": "insufficient_quota" when the user's token budget is used
up; "code": "server_error" for a failure nothing expected: the page stops following the answer),
"usage" (as each turn ends, before its "done": the user's tokens today and this month against
their budgets, chat/quotas.py). "done" is a turn's last message: the next may follow at once.
"sources" and "delta" carry the event's "id"; a resume sends exactly the events after
"last_event". Details: docs/chat-site.md.
"""

import asyncio
import contextlib
import functools
import json
import logging

from channels.db import database_sync_to_async
from channels.generic.websocket import AsyncJsonWebsocketConsumer
from django.db import DatabaseError
from django.http import Http404

from chat import conversations, events, quotas, resume, services
from chat.models import Message
from chat.relay import Formatter, relay
from llmsite import contract, metrics
from llmsite.errors import ApiError, InvalidRequest, QuotaExceeded, outage

log = logging.getLogger(__name__)

# After Stop, how long to wait for the worker's last word before keeping what was shown.
STOP_GRACE_SECONDS = 10.0
# Answers whose page went away keep running to their stored end; strong references live here.
_detached: set[asyncio.Task] = set()


class _Answer(Formatter):
    """One answer on the page: what the page was shown (deltas stop at Stop) and how it ended;
    the chat socket's formatter of the request's events."""

    def __init__(self, turn, after: str = "0"):
        self.turn = turn
        self.after = after  # a resume: events up to this id were sent before
        self.text = ""
        self.final: contract.Final | None = None
        self.error = ""
        self.sources = []
        self.stopped = False
        self.generation = None
        self.reader: asyncio.Task | None = None

    def _new(self) -> str | None:
        """The current event's id if the page has not had it yet, else None."""
        event_id = self.generation.event_id
        return event_id if events.id_after(event_id, self.after) else None

    def on_delta(self, event: contract.Delta) -> list:
        if self.stopped:
            return []
        self.text += event.text
        event_id = self._new()
        return [{"type": "delta", "text": event.text, "id": event_id}] if event_id else []

    def on_queued(self, event: contract.Queued) -> list:
        """The place in line, shown in place of the answer until its first token."""
        return [{"type": "queued", "position": event.position, "wait_seconds": event.wait_seconds}]

    def on_received(self, event: contract.Received) -> list:
        """The worker waits for the deployment's model to load: shown like the place in line."""
        return [{"type": "loading", "worker": event.worker, "seconds": event.loading_seconds}]

    def on_sources(self, event: contract.Sources) -> list:
        self.sources = event.sources
        event_id = self._new()
        return [{"type": "sources", "sources": event.sources, "id": event_id}] if event_id else []

    def on_final(self, event: contract.Final) -> list:
        self.final = event
        return []

    def on_error(self, event: contract.Error) -> list:
        self.error = event.message
        return []


class ChatConsumer(AsyncJsonWebsocketConsumer):
    async def connect(self):
        user = self.scope.get("user")
        if user is None or not user.is_authenticated:
            await self.close(code=4401)
            return
        self.user = user
        self.task: asyncio.Task | None = None
        self.answer: _Answer | None = None
        self.gone = False
        await self.accept()

    async def receive(self, text_data=None, bytes_data=None, **kwargs):
        try:
            content = json.loads(text_data if text_data is not None else bytes_data)
        except (TypeError, ValueError, RecursionError):  # RecursionError: nested too deeply
            await self._say({"type": "error", "message": "Messages must be JSON objects.", "param": "body"})
            return
        await self.receive_json(content)

    async def receive_json(self, content, **kwargs):
        kind = content.get("type") if isinstance(content, dict) else None
        if kind == "stop":
            try:
                await self._stop()
            except Exception as exc:  # Redis away: the answer goes on, and ends after the grace period
                message = outage("The answer could not be stopped", exc, trace=True)
                await self._say({"type": "error", "message": message, "param": "stop"})
        elif kind in ("send", "regenerate", "resume"):
            if self.task is not None and not self.task.done():
                await self._say({"type": "error", "message": "An answer is still streaming: stop it first."})
                return
            if kind == "resume":
                work = functools.partial(_resume_view, self, content)
            else:
                work = functools.partial(self._turn, content, regenerate=kind == "regenerate")
            self.task = asyncio.create_task(self._guarded(work))
        else:
            await self._say({"type": "error", "message": f"Unknown message type {kind!r}.", "param": "type"})

    async def disconnect(self, code):
        # The page went away: the answer runs on for the grace period (a reload or a reconnect
        # resumes it; else it is cancelled then) and is stored as it ended. A resumed view just ends.
        self.gone = True
        task, answer = getattr(self, "task", None), getattr(self, "answer", None)
        if task is None or task.done():
            return
        if isinstance(answer, _View):
            task.cancel()
            return
        _detached.add(task)
        task.add_done_callback(_detached.discard)
        if answer is not None and answer.generation is not None:
            answer.generation.detach()

    async def _guarded(self, work) -> None:
        """Run one message's work (a coroutine function); a failure that nothing in it expected
        (a bug, Redis away) is logged and told to the page, which would otherwise wait for a
        reply that never comes."""
        try:
            await work()
        except Exception as exc:
            message = outage("The server could not handle this message", exc, trace=True)
            await self._say({"type": "error", "message": message, "code": "server_error"})

    async def _say(self, message: dict) -> None:
        if self.gone:
            return
        try:
            await self.send_json(message)
        except Exception:  # the socket closed under us; the answer is still stored
            self.gone = True

    async def _stop(self) -> None:
        answer = self.answer
        if answer is None or answer.stopped:
            return
        answer.stopped = True
        if answer.reader is not None:
            await self._cancel(answer)

    async def _cancel(self, answer: _Answer) -> None:
        """Ask the worker to stop; its final event ends the stream, or the grace period does
        (also where the asking failed)."""
        asyncio.get_running_loop().call_later(STOP_GRACE_SECONDS, answer.reader.cancel)
        await answer.generation.cancel()

    async def _turn(self, content: dict, *, regenerate: bool) -> None:
        try:
            turn = await services.edge(
                conversations.turn_start,
                user=self.user,
                conversation_id=content.get("conversation"),
                data=content,
                regenerate=regenerate,
            )
        except QuotaExceeded as exc:
            metrics.refused(exc)
            await self._usage()
            await self._say({"type": "error", "message": exc.message, "param": exc.param, "code": exc.code})
            return
        except ApiError as exc:
            metrics.refused(exc)
            await self._say({"type": "error", "message": exc.message, "param": exc.param})
            return
        except Http404:
            metrics.refused(InvalidRequest("No such conversation."))
            await self._say({"type": "error", "message": "No such conversation.", "param": "conversation"})
            return
        answer = self.answer = _Answer(turn)
        try:
            await self._say(_turn_message(turn))
            await self._generate(answer)
        except Exception as exc:  # the turn is stored: it ends as an error, not left streaming
            answer.error = answer.error or outage("The answer failed", exc, trace=True)
        finally:
            self.answer = None
            await self._finish(answer)

    async def _usage(self) -> None:
        """The user's tokens against their budgets, for the line under the sampling controls."""
        try:
            usage = await database_sync_to_async(quotas.summary)(self.user)
        except Exception:  # the database away: the line keeps its last value
            log.warning("could not read the token usage of user %s", self.user.pk, exc_info=True)
            return
        await self._say({"type": "usage", **usage})

    async def _generate(self, answer: _Answer) -> None:
        try:
            answer.generation = await services.dispatch(answer.turn.prepared)
        except ApiError as exc:
            metrics.refused(exc)
            answer.error = exc.message
            return
        if self.gone:  # the page left while the request was being queued
            answer.generation.detach()
        try:
            await database_sync_to_async(conversations.answer_link)(
                answer=answer.turn.answer, request_id=answer.generation.request_id
            )
            await self._say({"type": "request", "request": answer.generation.request_id})
            await self._read(answer)
        finally:
            await answer.generation.close()

    async def _read(self, answer: _Answer) -> None:
        """Relay the answer's events in a task of their own, which Stop's grace period cancels
        when the worker never confirms: that ends the read quietly (the answer is kept as shown,
        marked cancelled); any other cancel goes on."""
        answer.reader = asyncio.create_task(self._relay(answer))
        try:
            if answer.stopped:  # Stop arrived while the request was being queued
                await self._cancel(answer)
            await answer.reader
        except asyncio.CancelledError:
            if not answer.reader.cancelled() or asyncio.current_task().cancelling():
                raise  # the server is stopping, or the page of a resumed view went away
        finally:
            answer.reader.cancel()  # a no-op once it ended

    async def _relay(self, answer: _Answer) -> None:
        async with contextlib.aclosing(relay(answer.generation, answer)) as messages:
            async for message in messages:
                await self._say(message)

    async def _finish(self, answer: _Answer) -> None:
        """Store how the answer ended; then the usage line and, last of all, "done": the page may
        send its next message as soon as it has it."""
        text, status = _ending(answer)
        error = answer.error if status == Message.Status.ERROR else ""
        try:
            stored = await database_sync_to_async(conversations.answer_finish)(
                answer=answer.turn.answer, content=text, status=status, error=error, sources=answer.sources
            )
            done = _done_message(stored.pk, stored.status, stored.content, stored.error)
        except Exception as exc:  # the database away: the page still learns the answer's end
            done = _done_message(answer.turn.answer.pk, Message.Status.ERROR, text, _unsaved(answer.turn.answer.pk, exc))
        await self._usage()
        await self._say(done)


def _ending(answer: _Answer) -> tuple[str, str]:
    """The text and status an answer ended with: the worker's final word, unless the page stopped
    it first (then exactly what the page showed: words the worker wrote after Stop are dropped);
    else what was shown, marked error, or cancelled (the server stopping before the final word)."""
    final = answer.final
    cancelled = final is not None and final.finish_reason == "cancelled"
    if final is not None and not (answer.stopped and cancelled):
        return final.text, Message.Status.CANCELLED if cancelled else Message.Status.OK
    if answer.stopped:
        return answer.text, Message.Status.CANCELLED
    return answer.text, Message.Status.ERROR if answer.error else Message.Status.CANCELLED


def _unsaved(message_id: int, exc: Exception) -> str:
    """The page's (and the log's) word for an answer's end that could not be stored."""
    return outage(f"The answer {message_id} could not be saved", exc, trace=not isinstance(exc, DatabaseError))


class _View(_Answer):
    """A resumed answer: the events after the page's last one. The answer's own turn stores it; a
    view stores the end it saw only where that turn never did (`_settle`)."""

    def __init__(self, message_id: int, after: str):
        super().__init__(None, after)
        self.message_id = message_id


async def _resume_view(consumer: ChatConsumer, content: dict) -> None:
    request_id, after = content.get("request"), content.get("last_event") or "0"
    if not events.valid_event_id(after):
        await consumer._say({"type": "error", "message": "'last_event' must be an event id.", "param": "last_event"})
        return
    try:
        found = await services.edge(resume.answer_of, user=consumer.user, request_id=request_id)
        if found is None:
            raise InvalidRequest("No such answer to resume.", param="request")
        if found.status != Message.Status.STREAMING:  # it ended (and was stored) meanwhile
            await consumer._say(_done_message(found.pk, found.status, found.content, found.error))
            return
        ended = await services.edge(resume.stored_end, request_id=found.request_id)
        worker = await services.edge(resume.worker_of, request_id=found.request_id) if ended is None else ""
    except ApiError as exc:  # the page stops waiting for this answer
        await consumer._say({"type": "error", "message": exc.message, "param": "request"})
        return
    if ended is not None:  # its socket's process died before storing it, and the events are gone
        await _settle(found.pk, ended.status, ended.response, ended.error)
        await consumer._say(_done_message(found.pk, ended.status, ended.response, ended.error))
        return
    if consumer.gone:  # the page left during the lookups: nobody to follow it for
        return
    view = consumer.answer = _View(found.pk, after)
    try:
        view.generation = await resume.follow(request_id, after="0", worker=worker)  # from the start: the final's missing tail is known
        await consumer._read(view)
    finally:
        consumer.answer = None
        if view.generation is not None:
            await view.generation.close()
    if view.final is None and not view.stopped:  # an error: stored only where the request's row ended
        await _end_after_error(consumer, found.pk, found.request_id, view)
        return
    text, status = _ending(view)
    await _settle(found.pk, status, text, "", view.sources)
    await consumer._say(_done_message(found.pk, status, text, ""))


async def _end_after_error(consumer: ChatConsumer, message_id: int, request_id, view: _View) -> None:
    """A resumed view that ended in an error: where the request's row ended (its worker failed
    it, or died and a web process or a worker's sweep failed the row), that end is stored, so a
    reload shows it instead of resuming the answer again; else (the view's own stream broke, the
    request may still run) the page is told the error and nothing is stored."""
    try:
        ended = await services.edge(resume.ended_row, request_id=request_id)
    except ApiError:  # the database away: the page is still told the error
        ended = None
    if ended is None:
        await consumer._say(_done_message(message_id, Message.Status.ERROR, view.text, view.error))
        return
    text = ended.response or view.text
    error = (ended.error or view.error) if ended.status == Message.Status.ERROR else ""
    await _settle(message_id, ended.status, text, error, view.sources)
    await consumer._say(_done_message(message_id, ended.status, text, error))


async def _settle(message_id: int, status: str, content: str, error: str, sources=None) -> None:
    """A resumed view saw the answer's end: stored, if its own socket never did (that web process
    stopped mid-answer), so that the conversation's history and its page hold it from now on."""
    try:
        await database_sync_to_async(conversations.answer_settle)(
            answer_id=message_id, content=content, status=status, error=error, sources=sources
        )
    except DatabaseError as exc:  # the page is still told the end
        _unsaved(message_id, exc)


def _done_message(message_id, status, content, error) -> dict:
    return {"type": "done", "message_id": message_id, "status": status, "content": content, "error": error}


def _turn_message(turn) -> dict:
    conversation = turn.conversation
    return {
        "type": "turn",
        "created": turn.created,
        "conversation": {"id": str(conversation.pk), "title": conversation.title, "url": f"/c/{conversation.pk}/"},
        "question": {"id": turn.question.pk, "content": turn.question.content},
        "answer": {"id": turn.answer.pk},
    }
