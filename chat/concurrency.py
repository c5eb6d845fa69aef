"""A cap on each deployment's generations in flight, so a burst gets 429 at once instead of a queue
that grows without bound.

The count is a Redis sorted set per deployment: one member per generation, scored with the time
its lease ends. The web tier takes a slot before it stores and enqueues a request, renews the lease
while events arrive and gives the slot back when the stream ends (`Generation.close`). A slot whose
web process died is never given back, so it simply expires with its lease: nothing leaks for good.
A worker that dies is noticed by the stream's watchdog, which ends the stream and so frees the slot.
"""

import asyncio
import logging
import time
import uuid

from asgiref.sync import sync_to_async
from django.conf import settings

from chat import events
from llmsite import admission, contract
from llmsite.errors import RateLimited

log = logging.getLogger(__name__)

# KEYS: the deployment's set. ARGV: limit, lease seconds, member. Returns -1 when admitted, else
# the number in flight. Expired leases are dropped first, on the Redis server's clock.
_ACQUIRE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
local count = redis.call('ZCARD', KEYS[1])
if count >= tonumber(ARGV[1]) then return count end
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[2]), ARGV[3])
redis.call('EXPIRE', KEYS[1], math.ceil(tonumber(ARGV[2])) + 1)
return -1
"""

_RENEW = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
if redis.call('ZADD', KEYS[1], 'XX', 'CH', now + tonumber(ARGV[1]), ARGV[2]) == 1 then
  redis.call('EXPIRE', KEYS[1], math.ceil(tonumber(ARGV[1])) + 1)
end
"""


def key(deployment_id) -> str:
    return f"llmsite:inflight:{deployment_id}"


class Slot:
    """One generation's place in its deployment's count; `release()` is safe to call twice."""

    def __init__(self, deployment_id):
        self.key = key(deployment_id)
        self.member = uuid.uuid4().hex
        self.lease = settings.GENERATION_LEASE_SECONDS
        self.renewed_at = time.monotonic()
        self.released = False

    async def renew(self) -> None:
        """Push the lease on, at most a few times per lease (not once per token)."""
        if self.released or time.monotonic() - self.renewed_at < self.lease / 4:
            return
        self.renewed_at = time.monotonic()
        try:
            await events.async_client().eval(_RENEW, 1, self.key, self.lease, self.member)
        except Exception:  # a Redis blip must not end a stream that is still flowing
            log.warning("could not renew an in-flight slot of %s", self.key, exc_info=True)

    async def release(self) -> None:
        if not self.released:
            self.released = True
            await events.async_client().zrem(self.key, self.member)


async def give_back(slot: Slot | None) -> None:
    """Give a slot back, to the end even where the caller is cancelled meanwhile (a client that
    left, a shutdown); if Redis is gone, its lease expires instead."""
    if slot is not None:
        await asyncio.shield(_release_quietly(slot))


async def _release_quietly(slot: Slot) -> None:
    try:
        await slot.release()
    except Exception:
        log.warning("could not release an in-flight slot; its lease will expire", exc_info=True)


async def acquire(*, deployment) -> Slot:
    """A slot for one more generation of `deployment`, or RateLimited (429) when it has its limit."""
    slot = Slot(deployment.pk)
    limit = deployment.max_concurrent_generations
    try:
        count = await events.async_client().eval(_ACQUIRE, 1, slot.key, limit, slot.lease, slot.member)
    except asyncio.CancelledError:  # the script may have run, and taken the slot, on the server
        await give_back(slot)
        raise
    if int(count) >= 0:
        raise RateLimited(
            f"The deployment '{deployment.name}' is generating its limit of {limit} answers at once: "
            "retry in a moment.",
            retry_after=1,
            reason="overloaded",
        )
    return slot



# --- fair turns (llmsite/admission.py): each user's waiting line -------------------------------


def too_many_waiting(deployment, user_id) -> RateLimited:
    return RateLimited(
        f"You have {deployment.max_waiting_per_user} requests waiting for the deployment '{deployment.name}' "
        "(its max_waiting_per_user): retry when one has started.",
        retry_after=1,
        reason="overloaded",
    )


async def check_waiting(*, deployment, user_id) -> None:
    """429 at once when the user has their limit waiting (`enqueue` checks again, atomically)."""
    if await sync_to_async(admission.waiting_of)(deployment.name, admission.user_key(user_id)) >= deployment.max_waiting_per_user:
        raise too_many_waiting(deployment, user_id)


def enqueue(*, deployment, user_id, request_id: str, body: dict) -> None:
    """Put a stored request in its user's line for the workers, and tell it its place."""
    if not admission.enqueue(
        deployment=deployment.name,
        queue=deployment.queue,
        user=admission.user_key(user_id),
        request_id=request_id,
        body=body,
        max_waiting=deployment.max_waiting_per_user,
        capacity=deployment.max_batch_size,
    ):
        raise too_many_waiting(deployment, user_id)
    announce(deployment.name)


def announce(deployment: str, *, everyone: bool = False) -> None:
    """A `queued` event for each waiting request whose place in line improved (`everyone`: for
    each waiting request, which also keeps its stream's watchdog from taking a long wait for a
    silent worker)."""
    for request_id, position, wait in admission.line_moves(deployment, everyone=everyone):
        events.publish(request_id, contract.Queued(position=position, wait_seconds=wait), ride_out=False)


def withdraw(deployment: str, request_id: str) -> bool:
    """Take a request out of its line (the client left, or pressed Stop); True when it was still waiting."""
    if admission.done(deployment=deployment, request_id=request_id) != 2:
        return False
    announce(deployment)
    return True
