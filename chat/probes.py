"""Is a deployment served? A one-token request through the normal path, answered or not in time."""

import asyncio

from chat import services
from chat.errors import ApiError
from chat.generation import Conversation
from chat.models import Deployment
from chat.protocols.predict import PredictFields

CHECK_PROMPT = "Say OK."


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
            async for event in generation.events():
                if event["type"] == "final":
                    return True, f"Deployment '{deployment.name}': the worker answered (request {generation.request_id})."
                if event["type"] == "error":
                    return False, f"Deployment '{deployment.name}': the worker answered with an error: {event['message']}"
    except TimeoutError:
        return False, (
            f"Deployment '{deployment.name}': no worker answered within {timeout:g} s: is a worker serving the "
            f"queue '{deployment.queue}'?"
        )
    finally:
        await generation.close()
    return False, f"Deployment '{deployment.name}': the stream ended without an answer."


async def deployments_check(*, deployments: list[Deployment], user, timeout: float) -> list[tuple[bool, str]]:
    return await asyncio.gather(*(deployment_check(deployment=d, user=user, timeout=timeout) for d in deployments))
