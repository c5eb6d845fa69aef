"""Is a deployment served? A one-token request through the normal path, answered or not in time."""

import asyncio

from chat import services
from chat.generation import Conversation
from chat.models import Deployment
from chat.protocols.predict import PredictFields
from chat.relay import Formatter, first
from llmsite import contract
from llmsite.errors import ApiError

CHECK_PROMPT = "Say OK."


class _Verdict(Formatter):
    """(answered?, what to tell the operator) from the check's end."""

    def __init__(self, deployment: Deployment, request_id: str):
        self.name, self.request_id = deployment.name, request_id

    def on_final(self, event: contract.Final) -> list:
        return [(True, f"Deployment '{self.name}': the worker answered (request {self.request_id}).")]

    def on_error(self, event: contract.Error) -> list:
        return [(False, f"Deployment '{self.name}': the worker answered with an error: {event.message}")]


async def deployment_check(*, deployment: Deployment, user, timeout: float) -> tuple[bool, str]:
    """(answered?, what to tell the operator). The request is stored like any other (protocol "check")."""
    fields = PredictFields(prompt=CHECK_PROMPT, max_new_tokens=1, do_sample=False)
    try:
        prepared = await services.edge(
            services.prepare,
            token=None,
            user=user,
            deployment=deployment,
            conversation=Conversation(prompt=CHECK_PROMPT),
            fields=fields,
            protocol="check",
        )
        generation = await services.dispatch(prepared)
    except ApiError as exc:
        return False, f"Deployment '{deployment.name}': {exc.message}"
    try:
        async with asyncio.timeout(timeout):
            verdict = await first(generation, _Verdict(deployment, generation.request_id))
    except TimeoutError:
        return False, (
            f"Deployment '{deployment.name}': no worker answered within {timeout:g} s: is a worker serving the "
            f"queue '{deployment.queue}'?"
        )
    finally:
        await generation.close()
    return verdict or (False, f"Deployment '{deployment.name}': the stream ended without an answer.")


async def deployments_check(*, deployments: list[Deployment], user, timeout: float) -> list[tuple[bool, str]]:
    return await asyncio.gather(*(deployment_check(deployment=d, user=user, timeout=timeout) for d in deployments))
