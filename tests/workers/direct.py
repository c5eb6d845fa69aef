"""A GenerationRequest handed to the workers as the web tier hands it: stored, then put in its
user's line for the deployment (chat.concurrency.enqueue, llmsite/admission.py); and every event
of the request's stream read back from Redis, in order."""

import time

from chat import concurrency, events, lifecycle
from chat.models import Deployment
from llmsite import contract


def run_on_worker(user, request: contract.GenerationRequest, timeout: float = 120) -> list:
    """The request stored and sent; its events up to its terminal one (events_of)."""
    record(user, request)
    deployment = Deployment.objects.get(name=request.deployment)
    concurrency.enqueue(deployment=deployment, user_id=user.pk, request_id=request.request_id, body=request.to_wire())
    return events_of(request.request_id, timeout)


def record(user, request: contract.GenerationRequest) -> None:
    """The request's row, queued, as the web tier stores it before sending it."""
    lifecycle.record(
        request_id=request.request_id, user=user, token=None, deployment=Deployment.objects.get(name=request.deployment),
        protocol="http", prompt=request.messages[-1]["content"], system_prompt="", history=[], params={},
    )  # fmt: skip


def events_of(request_id: str, timeout: float = 120) -> list:
    """The request's events up to its terminal one (its place-in-line events left out)."""
    key, last, heard = events.channel(request_id), "0", []
    deadline = time.monotonic() + timeout  # bounds the wait; no speed is asserted
    while not any(isinstance(e, contract.TERMINAL) for e in heard):
        assert time.monotonic() < deadline, f"no end heard: {heard}"
        for _stream, entries in events.sync_client().xread({key: last}, block=1000) or []:
            for entry_id, fields in entries:
                last = entry_id
                event = contract.decode(fields[b"e"])
                if not isinstance(event, contract.Queued):
                    heard.append(event)
    return heard
