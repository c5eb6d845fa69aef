"""The generation path of the web tier: who is calling, what they may use, dispatch and stream.

Views and consumers parse their wire format, then call these; errors are the domain errors of
`chat.errors`, which the edge turns into its protocol's shape.
"""

import asyncio
import datetime
import logging
import time
import uuid
from dataclasses import dataclass

from asgiref.sync import sync_to_async
from django.conf import settings
from django.db import DatabaseError, connection
from django.db.models import Exists, OuterRef
from django.utils import timezone

from chat import concurrency, events, ratelimits
from chat.errors import (
    ApiError,
    ContextTooLong,
    Forbidden,
    InvalidRequest,
    ServerError,
    Unauthorized,
    Unavailable,
    UnknownDeployment,
)
from chat.generation import Conversation, SamplingParams
from chat.models import ApiToken, Deployment, RequestLog, hash_token
from chat.prompting import count_tokens, deployment_tokenizer, render_prompt
from chat.protocols.predict import PredictFields

log = logging.getLogger(__name__)

GENERATE_TASK = "workers.generate"
PROMPT_FORMAT_FIELDS = ("model_type", "chat_template", "context_length")  # sent with each generation task
LAST_USED_RESOLUTION = datetime.timedelta(minutes=1)  # how stale a token's last_used_at may be


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
    now = timezone.now()
    if token.last_used_at is None or now - token.last_used_at >= LAST_USED_RESOLUTION:
        ApiToken.objects.filter(pk=token.pk).update(last_used_at=now)  # a write (and commit) a minute, not a request
    return token


def check_token_active(*, token: ApiToken) -> None:
    """A token checked once at a WebSocket's handshake may be revoked while the socket is open:
    each later message checks again, so a revocation takes effect at once."""
    if not ApiToken.objects.filter(pk=token.pk, revoked_at__isnull=True, user__is_active=True).exists():
        raise Unauthorized("Invalid or revoked API token.")


def access_deployment(*, token: ApiToken, name: str) -> Deployment:
    """The deployment `name` if this token may use it (404 for unknown, 403 for out of scope)."""
    # Without its tokenizer files (megabytes): every request and open socket holds its deployment.
    # The token's scope comes in the same query (each round trip is on the way to the first token).
    scope = ApiToken.deployments.through.objects.filter(apitoken_id=token.pk)
    deployment = (
        Deployment.objects.defer("tokenizer_files")
        .filter(name=name, enabled=True)
        .annotate(token_scoped=Exists(scope), in_token_scope=Exists(scope.filter(deployment_id=OuterRef("pk"))))
        .first()
    )
    if deployment is None:
        raise UnknownDeployment(name)
    if deployment.token_scoped and not deployment.in_token_scope:
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


def check_retrieval(*, user, deployment: Deployment, fields: PredictFields) -> int | None:
    """The id of the knowledge base a `langchain: true` request draws on (None without langchain)."""
    if not fields.langchain:
        return None
    from knowledge.services import knowledge_base_for_request

    name = fields.knowledge_base
    if not name:
        if deployment.default_knowledge_base_id is None:
            raise InvalidRequest(
                f"The deployment '{deployment.name}' has no default knowledge base: name one in 'knowledge_base'.",
                param="knowledge_base",
            )
        name = deployment.default_knowledge_base.name
    return knowledge_base_for_request(user=user, name=name).pk


def fit_to_context(*, deployment: Deployment, conversation: Conversation, params: SamplingParams) -> int | None:
    """Count the prompt's tokens; refuse a prompt the context cannot hold; cap max_new_tokens."""
    context = deployment.effective_context_length
    tokenizer = deployment_tokenizer(deployment)
    if tokenizer is None or not context:
        return None  # no worker has published the tokenizer yet: the worker checks instead
    text = render_prompt(tokenizer, conversation.messages(), deployment.chat_template, deployment.model_type)
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
    knowledge_base: int | None = None  # langchain: the knowledge base's id, searched on the worker
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
    knowledge_base = check_retrieval(user=user or token.user, deployment=deployment, fields=fields)
    fit_to_context(deployment=deployment, conversation=conversation, params=params)
    if token is not None:
        ratelimits.admit(token=token)  # last: a refused request does not use up the token's quota
    return Prepared(deployment, token, conversation, params, protocol, knowledge_base=knowledge_base, user=user or token.user)


def storable(value):
    """PostgreSQL text and jsonb refuse NUL characters: the stored copy shows them as U+FFFD."""
    if isinstance(value, str):
        return value.replace("\x00", "\ufffd")
    if isinstance(value, list):
        return [storable(v) for v in value]
    if isinstance(value, dict):
        return {k: storable(v) for k, v in value.items()}
    return value


def _record(prepared: Prepared, request_id: str) -> RequestLog:
    return RequestLog.objects.create(
        id=request_id,
        user=prepared.user,
        token=prepared.token,
        deployment=prepared.deployment,
        protocol=prepared.protocol,
        prompt=storable(prepared.conversation.prompt),
        system_prompt=storable(prepared.conversation.system_prompt),
        history=storable(prepared.conversation.history),
        params=storable(prepared.params.as_dict()),
    )


def cache_scope(user) -> str:
    """Which requests may share the KV cache rows this one leaves in the engine (KV_CACHE_SCOPE)."""
    if settings.KV_CACHE_SCOPE == "deployment" or user is None:
        return ""
    return f"user:{user.pk}"


def _enqueue(prepared: Prepared, request_id: str) -> None:
    from workers.celery import app

    deployment = prepared.deployment
    app.send_task(
        GENERATE_TASK,
        task_id=request_id,
        queue=deployment.queue,
        kwargs={
            "request_id": request_id,
            "deployment": deployment.name,
            # how to render the prompt, as the web tier read it for this request (a WebSocket
            # message reads it again): the worker needs no query for it
            "prompt_format": {f: getattr(deployment, f) for f in PROMPT_FORMAT_FIELDS},
            "messages": prepared.conversation.messages(),
            "params": prepared.params.as_dict(),
            "knowledge_base": prepared.knowledge_base,
            "cache_scope": cache_scope(prepared.user),
        },
        # The message's headers and the worker's log name the request, not its whole text (Celery
        # would write a copy of the conversation there, and spend ~0.45 ms doing it).
        kwargsrepr=f"{{'request_id': '{request_id}'}}",
    )


def store_and_enqueue(prepared: Prepared, request_id: str) -> None:
    """Store the request, hand the connection back to the pool, and queue the task: one call from
    the event loop (each call into sync code is a thread hop on the way to the first token)."""
    try:
        _record(prepared, request_id)
    except DatabaseError as exc:
        raise ServerError(f"The database is unavailable: {exc}") from None
    release_connection()  # the request's last query before its stream
    try:
        _enqueue(prepared, request_id)
    except Exception as exc:
        try:
            _mark_failed(request_id, f"could not enqueue: {exc}")
        except DatabaseError:
            log.exception("could not mark %s failed", request_id)
        raise ServerError(f"The request could not be queued: {exc}") from None


def release_connection() -> None:
    """Hand this thread's database connection back to the pool (outside a transaction only)."""
    if not connection.in_atomic_block:
        connection.close()


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

    def __init__(
        self,
        request_id: str,
        subscription: events.Subscription,
        token: ApiToken | None = None,
        slot: concurrency.Slot | None = None,
    ):
        self.request_id = request_id
        self.subscription = subscription
        self.token = token  # whose tokens-per-minute window the usage goes to
        self.slot = slot  # the deployment's in-flight slot, given back by close()
        self.finished = False

    async def events(self):
        try:
            async for event in self.subscription.events():
                if self.slot is not None:
                    await self.slot.renew()
                if event["type"] in ("final", "error"):
                    self.finished = True
                if event["type"] == "final" and self.token is not None:
                    await ratelimits.record_tokens(token=self.token, tokens=sum(v or 0 for v in event["usage"].values()))
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
        await _release(self.slot)


async def _release(slot: concurrency.Slot | None) -> None:
    """Give a deployment's in-flight slot back; if Redis is gone, its lease expires instead."""
    if slot is not None:
        try:
            await slot.release()
        except Exception:
            log.warning("could not release an in-flight slot; its lease will expire", exc_info=True)


async def wait_for_worker(queue: str) -> None:
    """Return once a live worker consumes `queue`; 503 after WORKER_WAIT_SECONDS without one."""
    deadline = time.monotonic() + settings.WORKER_WAIT_SECONDS
    while not await events.queue_has_worker(queue):
        if time.monotonic() >= deadline:
            raise Unavailable(
                f"No model worker is serving this deployment (queue '{queue}'); waited "
                f"{settings.WORKER_WAIT_SECONDS:g} s. Start one with: celery -A workers worker -Q {queue}"
            )
        await asyncio.sleep(0.5)


async def dispatch(prepared: Prepared) -> Generation:
    """Take an in-flight slot (429 over the deployment's limit), subscribe to the request's stream,
    then store and enqueue it (so no event is missed)."""
    try:
        await wait_for_worker(prepared.deployment.queue)
        slot = await concurrency.acquire(deployment=prepared.deployment)
    except ApiError:
        raise
    except Exception as exc:  # Redis unreachable
        raise Unavailable(f"Redis is unavailable: {exc}") from None
    request_id = str(uuid.uuid4())
    subscription = events.Subscription(request_id)
    try:
        await subscription.open()
        await sync_to_async(store_and_enqueue)(prepared, request_id)
    except Exception as exc:
        await subscription.close()
        await _release(slot)
        if isinstance(exc, ApiError):
            raise
        raise ServerError(f"The request could not be queued: {exc}") from None
    return Generation(request_id, subscription, prepared.token, slot=slot)


async def edge(func, /, **kwargs):
    """Run a sync service from async code; ApiErrors pass through, database outages become 503."""
    try:
        return await sync_to_async(func)(**kwargs)
    except ApiError:
        raise
    except DatabaseError as exc:
        raise Unavailable(f"The database is unavailable: {exc}") from None
