"""The generation path of the web tier: who is calling, what they may use, dispatch and stream.

Views and consumers parse their wire format, then call these; errors are the domain errors of
`chat.errors`, which the edge turns into its protocol's shape.
"""

import logging
import uuid
from dataclasses import dataclass

from asgiref.sync import sync_to_async
from django.db import DatabaseError
from django.utils import timezone

from chat import events
from chat.errors import ApiError, ContextTooLong, Forbidden, InvalidRequest, ServerError, Unauthorized, UnknownDeployment
from chat.generation import Conversation, SamplingParams
from chat.models import ApiToken, Deployment, RequestLog, hash_token
from chat.prompting import count_tokens, edge_tokenizer, render_prompt
from chat.protocols.predict import PredictFields

log = logging.getLogger(__name__)

GENERATE_TASK = "workers.generate"


def token_from_header(value: str | None) -> str | None:
    """`Authorization: <token>` and `Authorization: Bearer <token>` are both accepted."""
    if not value:
        return None
    value = value.strip()
    scheme, _, rest = value.partition(" ")
    if scheme.lower() == "bearer" and rest.strip():
        return rest.strip()
    return value or None


def authenticate(*, header: str | None) -> ApiToken:
    raw = token_from_header(header)
    if not raw:
        raise Unauthorized("Missing API token: send it in the Authorization header.")
    token = ApiToken.objects.select_related("user").filter(digest=hash_token(raw)).first()
    if token is None or not token.is_active or not token.user.is_active:
        raise Unauthorized("Invalid or revoked API token.")
    ApiToken.objects.filter(pk=token.pk).update(last_used_at=timezone.now())
    return token


def access_deployment(*, token: ApiToken, name: str) -> Deployment:
    """The deployment `name` if this token may use it (404 for unknown, 403 for out of scope)."""
    deployment = Deployment.objects.filter(name=name, enabled=True).first()
    if deployment is None:
        raise UnknownDeployment(name)
    if token.deployments.exists() and not token.deployments.filter(pk=deployment.pk).exists():
        raise Forbidden(f"This token may not use the deployment '{name}'.", param="deployment")
    return deployment


def sampling_for(*, deployment: Deployment, fields: PredictFields) -> SamplingParams:
    def pick(value, default):
        return default if value is None else value

    return SamplingParams(
        max_new_tokens=pick(fields.max_new_tokens, deployment.default_max_new_tokens),
        temperature=float(pick(fields.temperature, deployment.default_temperature)),
        top_k=pick(fields.top_k, deployment.default_top_k),
        top_p=float(pick(fields.top_p, deployment.default_top_p)),
        do_sample=pick(fields.do_sample, deployment.default_do_sample),
        use_cache=pick(fields.use_cache, True),
    )


def check_retrieval(*, deployment: Deployment, fields: PredictFields) -> None:
    if fields.langchain:
        name = fields.knowledge_base
        what = f"the knowledge base '{name}'" if name else f"a default knowledge base for '{deployment.name}'"
        raise InvalidRequest(f"There is no {what}.", param="knowledge_base")


def fit_to_context(*, deployment: Deployment, conversation: Conversation, params: SamplingParams) -> int | None:
    """Count the prompt's tokens; refuse a prompt the context cannot hold; cap max_new_tokens."""
    context = deployment.effective_context_length
    tokenizer = edge_tokenizer(deployment.tokenizer_files)
    if tokenizer is None or not context:
        return None  # no worker has published the tokenizer yet: the worker checks instead
    text = render_prompt(tokenizer, conversation.messages(), deployment.chat_template)
    prompt_tokens = count_tokens(tokenizer, text)
    if prompt_tokens >= context:
        raise ContextTooLong(prompt_tokens=prompt_tokens, context_length=context)
    params.max_new_tokens = min(params.max_new_tokens, context - prompt_tokens)
    return prompt_tokens


@dataclass
class Prepared:
    deployment: Deployment
    token: ApiToken | None  # None for the chat site's session users
    conversation: Conversation
    params: SamplingParams
    protocol: str
    user: object = None


def prepare(
    *,
    token: ApiToken | None,
    deployment: Deployment,
    conversation: Conversation,
    fields: PredictFields,
    protocol: str,
    user=None,
) -> Prepared:
    """Validate everything that needs no model work; raise the matching domain error.

    API calls pass their token; the chat site passes the logged-in `user` and no token.
    """
    params = sampling_for(deployment=deployment, fields=fields)
    check_retrieval(deployment=deployment, fields=fields)
    fit_to_context(deployment=deployment, conversation=conversation, params=params)
    return Prepared(deployment, token, conversation, params, protocol, user or token.user)


def _record(prepared: Prepared) -> RequestLog:
    return RequestLog.objects.create(
        id=uuid.uuid4(),
        user=prepared.user,
        token=prepared.token,
        deployment=prepared.deployment,
        protocol=prepared.protocol,
        prompt=prepared.conversation.prompt,
        system_prompt=prepared.conversation.system_prompt,
        history=prepared.conversation.history,
        params=prepared.params.as_dict(),
    )


def _enqueue(prepared: Prepared, request_id: str) -> None:
    from workers.celery import app

    app.send_task(
        GENERATE_TASK,
        task_id=request_id,
        queue=prepared.deployment.queue,
        kwargs={
            "request_id": request_id,
            "deployment": prepared.deployment.name,
            "messages": prepared.conversation.messages(),
            "params": prepared.params.as_dict(),
        },
    )


def _mark_failed(request_id: str, message: str) -> None:
    RequestLog.objects.filter(id=request_id, status__in=[RequestLog.Status.QUEUED, RequestLog.Status.RUNNING]).update(
        status=RequestLog.Status.ERROR, error=message, finished_at=timezone.now()
    )


def _mark_cancelled_if_queued(request_id: str) -> None:
    RequestLog.objects.filter(id=request_id, status=RequestLog.Status.QUEUED).update(
        status=RequestLog.Status.CANCELLED, finished_at=timezone.now()
    )


class Generation:
    """One dispatched request: iterate `events()` (always ending in final or error), then `close()`."""

    def __init__(self, request_id: str, subscription: events.Subscription):
        self.request_id = request_id
        self.subscription = subscription
        self.finished = False

    async def events(self):
        try:
            async for event in self.subscription.events():
                if event["type"] in ("final", "error"):
                    self.finished = True
                yield event
        except events.StreamTimeout as exc:
            self.finished = True
            await events.cancel(self.request_id)
            await sync_to_async(_mark_failed)(self.request_id, str(exc))
            yield {"type": "error", "message": str(exc)}
        except Exception as exc:  # Redis gone mid-stream: the client still gets an error event
            log.exception("stream %s broke", self.request_id)
            self.finished = True
            yield {"type": "error", "message": f"The token stream broke: {exc}"}

    async def close(self) -> None:
        """Stop listening; a request still running is cancelled on the worker (client gone)."""
        await self.subscription.close()
        if not self.finished:
            try:
                await events.cancel(self.request_id)
                await sync_to_async(_mark_cancelled_if_queued)(self.request_id)
            except Exception:
                log.exception("could not cancel %s", self.request_id)


async def dispatch(prepared: Prepared) -> Generation:
    """Store the request, subscribe to its stream, then enqueue it (so no event is missed)."""
    try:
        record = await sync_to_async(_record)(prepared)
    except DatabaseError as exc:
        raise ServerError(f"The database is unavailable: {exc}") from None
    request_id = str(record.id)
    subscription = events.Subscription(request_id)
    try:
        await subscription.open()
        await sync_to_async(_enqueue)(prepared, request_id)
    except Exception as exc:
        await subscription.close()
        await sync_to_async(_mark_failed)(request_id, f"could not enqueue: {exc}")
        raise ServerError(f"The request could not be queued: {exc}") from None
    return Generation(request_id, subscription)


async def edge(func, /, **kwargs):
    """Run a sync service from async code; ApiErrors pass through, database outages become 503."""
    try:
        return await sync_to_async(func)(**kwargs)
    except ApiError:
        raise
    except DatabaseError as exc:
        from chat.errors import Unavailable

        raise Unavailable(f"The database is unavailable: {exc}") from None
