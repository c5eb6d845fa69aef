"""A dispatched request in flight, as the web tier relays it: its events (the place in line kept
honest, a stream that broke ended with an error event), its Stop, and its end (the slot given back,
a request nobody listens to any more cancelled after the grace period)."""

import asyncio
import logging

from asgiref.sync import sync_to_async
from django.conf import settings
from django.db import Error as DBError

from chat import concurrency, events, lifecycle, ratelimits
from chat.models import ApiToken
from llmsite import contract, metrics, redis_outage
from llmsite.errors import outage

log = logging.getLogger(__name__)


class Generation:
    """One dispatched request: iterate `events()` (typed; always ending in a final or error
    event), `cancel()` to stop it (Stop), then `close()`."""

    def __init__(
        self,
        request_id: str,
        subscription: events.Subscription,
        token: ApiToken | None = None,
        slot: concurrency.Slot | None = None,
        deployment: str = "",
    ):
        self.request_id = request_id
        self.subscription = subscription
        self.token = token  # whose tokens-per-minute window the usage goes to
        self.slot = slot  # the deployment's in-flight slot, given back by close()
        self.deployment = deployment  # its name, for /metrics
        self.finished = False
        self.closed = False
        # Answer 0's text as heard here, kept on the row where the stream breaks: all of it only
        # for a reader from the start (a resumed one's would be a tail).
        self._said: list[str] | None = [] if subscription.last_id == "0" else None

    async def events(self):
        try:
            renew = self.slot.renew if self.slot is not None else None  # also while its worker waits for the model
            async for event in self._in_line(self.subscription.events(on_received=renew, ended=self._row_end)):
                if self.slot is not None:
                    await self.slot.renew()
                if isinstance(event, contract.Delta) and event.index == 0 and self._said is not None:
                    self._said.append(event.text)
                elif isinstance(event, contract.TERMINAL):
                    self.finished = True
                if isinstance(event, contract.Final) and self.token is not None:
                    await self._record_tokens(event.total_tokens)
                yield event
        except events.StreamTimeout as exc:
            self.finished = True
            self._count_error()
            await sync_to_async(lifecycle.fail_unanswered)(self.request_id, str(exc))
            yield contract.Error(str(exc))
        except Exception as exc:  # Redis gone mid-stream (for longer than REDIS_OUTAGE_SECONDS where a worker holds it)
            self.finished = True
            self._count_error()
            message = outage(f"The token stream of {self.request_id} broke", exc, trace=True)
            if self.subscription.worker and isinstance(exc, redis_outage.AWAY):  # its worker's end is refused: the client was told it failed
                await sync_to_async(lifecycle.fail_unanswered)(self.request_id, message, said="".join(self._said or ()))
            else:  # not started: none will start it now (one started is its worker's to end)
                await sync_to_async(lifecycle.fail_queued)(self.request_id, message)
            yield contract.Error(message)

    async def _row_end(self) -> contract.Event | None:
        """The request's end as its row keeps it, for a stream whose end Redis lost (None: none yet,
        or the database away)."""
        try:
            return await sync_to_async(lifecycle.end_event)(self.request_id)
        except DBError:
            log.warning("request %s: could not read its row", self.request_id, exc_info=True)
            return None

    async def _record_tokens(self, tokens: int) -> None:
        """The answer's tokens in its token's tokens-per-minute window; Redis away loses the count,
        not the answer."""
        try:
            await ratelimits.record_tokens(token=self.token, tokens=tokens)
        except Exception:
            log.warning("request %s: could not count its tokens", self.request_id, exc_info=True)

    async def _in_line(self, stream):
        """The events with the place in line kept honest: no `queued` after the start, and a last
        position 0 before it (a place told before the start was an estimate)."""
        told, started = None, False
        async for event in stream:
            if isinstance(event, contract.Queued):
                if started or (told is not None and event.position > told):
                    continue
                told = event.position
            elif not started and isinstance(event, (contract.Start, contract.Delta, *contract.TERMINAL)):
                started = True
                if told:
                    yield contract.Queued(position=0, wait_seconds=0.0)
            yield event

    def _count_error(self) -> None:
        """A stream the web tier ended itself (silence, a dead worker, Redis gone): no worker counts it."""
        metrics.count(deployment=self.deployment, worker="", outcome="error")

    async def cancel(self) -> None:
        """Ask the worker to stop this request (the one cancellation path: the request's cancel
        key, which the worker's cancel watcher reads); its final event still ends the stream.
        A request still waiting leaves its line, and its stream ends here."""
        await events.cancel(self.request_id)
        if await _withdraw(self.deployment, self.request_id):
            await sync_to_async(_cancelled_waiting)(self.request_id)

    @property
    def event_id(self) -> str:
        """The stream id of the event `events()` yielded last."""
        return self.subscription.last_id

    def detach(self) -> None:
        """Stop counting as a listener (the client went away): once no listener is left for
        RESUME_GRACE_SECONDS, the request is cancelled, unless it ended or someone resumed it."""
        if self.subscription.listening and not self.finished:
            self.subscription.detach()
            cancel_when_unheard(self.request_id, self.deployment)

    async def close(self) -> None:
        """Stop listening (a request still running is cancelled after the grace period if nobody
        resumes it) and give the slot back."""
        if self.closed:
            return
        self.closed = True
        self.detach()
        await self.subscription.close()
        if self.finished:
            await _withdraw(self.deployment, self.request_id)  # its turn, if its worker died
        await concurrency.give_back(self.slot)


async def _withdraw(deployment: str, request_id: str) -> bool:
    """Take the request out of its line or end its turn there; True when it was still waiting."""
    try:
        return bool(deployment) and await sync_to_async(concurrency.withdraw)(deployment, request_id)
    except Exception:
        log.warning("could not take %s out of the line", request_id, exc_info=True)
        return False


def _cancelled_waiting(request_id: str) -> None:
    lifecycle.cancel_queued(request_id)
    events.publish(request_id, contract.Final(text="", finish_reason="cancelled"), ride_out=False)


_unheard_checks: set[asyncio.Task] = set()


def cancel_when_unheard(request_id: str, deployment: str = "") -> None:
    """Cancel the request once its listen key lapsed (no listener renewed it for the grace period)."""
    task = asyncio.get_running_loop().create_task(_cancel_if_unheard(request_id, deployment))
    _unheard_checks.add(task)
    task.add_done_callback(_unheard_checks.discard)


async def _cancel_if_unheard(request_id: str, deployment: str) -> None:
    await asyncio.sleep(settings.RESUME_GRACE_SECONDS + 0.1)
    try:
        if await events.listened(request_id):
            return  # someone resumed it: their leaving checks again
        await events.cancel(request_id)
        if await _withdraw(deployment, request_id):  # still waiting: it leaves the line and ends here
            await sync_to_async(_cancelled_waiting)(request_id)
        else:
            await sync_to_async(lifecycle.cancel_queued)(request_id)
    except Exception:
        log.exception("could not cancel %s", request_id)
