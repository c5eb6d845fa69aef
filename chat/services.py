"""The generation path of the web tier: who is calling, what they may use, dispatch (the stream
itself, once dispatched: chat/in_flight.py).

Views and consumers parse their wire format, then call these; errors are the domain errors of
`llmsite.errors`, which the edge turns into its protocol's shape."""

import asyncio
import logging
import time
import uuid
from dataclasses import dataclass

from asgiref.sync import sync_to_async
from django.conf import settings
from django.db import DatabaseError, connection
from django.db.models import Exists, OuterRef

from chat import concurrency, events, lifecycle, quotas, ratelimits
from chat.in_flight import Generation, cancel_when_unheard
from llmsite import redis_outage
from llmsite.errors import (
    ApiError,
    Forbidden,
    InvalidRequest,
    RateLimited,
    ServerError,
    Unavailable,
    UnknownDeployment,
    concerning,
    outage,
)
from chat.generation import Conversation
from chat.models import ApiToken, Deployment
from chat.prompting import deployment_tokenizer, fit_prompt, tokenizer_digest
from chat.protocols.predict import PredictFields
from llmsite.contract import GenerationRequest, PromptFormat, SamplingParams

log = logging.getLogger(__name__)


def access_deployment(*, token: ApiToken, name: str) -> Deployment:
    """The deployment `name` if this token may use it (404 for unknown, 403 for out of scope)."""
    if "\x00" in name:  # no name holds one (PostgreSQL text refuses NUL)
        raise UnknownDeployment(name)
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
        with concerning(name):  # it exists: /metrics may name it
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
        repetition_penalty=float(pick(fields.repetition_penalty, 1.0)),
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


def prompt_format_of(deployment: Deployment) -> PromptFormat:
    return PromptFormat(model_type=deployment.model_type, chat_template=deployment.chat_template, context_length=deployment.context_length)


def fit_to_context(*, deployment: Deployment, conversation: Conversation, params: SamplingParams) -> tuple[list[int] | None, str]:
    """The prompt's token ids, counted and checked once here (ContextTooLong; max_new_tokens capped),
    and the digest of the tokenizer files that counted them; (None, "") while no worker has
    published the tokenizer: the worker fits the prompt then."""
    context = deployment.effective_context_length
    tokenizer = deployment_tokenizer(deployment)
    if tokenizer is None or not context:
        return None, ""
    ids = fit_prompt(tokenizer, conversation.messages(), prompt_format_of(deployment), params, context_length=context, tools=conversation.tools)
    return ids, tokenizer_digest(tokenizer)


@dataclass
class Prepared:
    deployment: Deployment
    token: ApiToken | None  # None for the chat site's session users
    conversation: Conversation
    params: SamplingParams
    protocol: str
    knowledge_base: int | None = None  # langchain: the knowledge base's id, searched on the worker
    user: object = None
    prompt_ids: list[int] | None = None  # counted here; None: the worker fits the prompt
    tokenizer_digest: str = ""  # the tokenizer files that counted prompt_ids


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
    with concerning(deployment.name):
        params = sampling_for(deployment=deployment, fields=fields)
        knowledge_base = check_retrieval(user=user or token.user, deployment=deployment, fields=fields)
        prompt_ids, digest = fit_to_context(deployment=deployment, conversation=conversation, params=params)
        quotas.check(user=user or token.user)  # the user's daily and monthly token budgets (429)
        if token is not None:
            ratelimits.admit(token=token)  # last: a refused request does not use up the token's quota
    if knowledge_base is not None:
        prompt_ids = None  # the worker adds the sources to the messages, and fits them then
    prepared = Prepared(deployment, token, conversation, params, protocol, knowledge_base=knowledge_base, user=user or token.user)
    prepared.prompt_ids, prepared.tokenizer_digest = prompt_ids, digest
    return prepared


def cache_scope(user) -> str:
    """Which requests may share the KV cache rows this one leaves in the engine (KV_CACHE_SCOPE)."""
    if settings.KV_CACHE_SCOPE == "deployment" or user is None:
        return ""
    return f"user:{user.pk}"


def generation_request(prepared: Prepared, request_id: str) -> GenerationRequest:
    """What the worker is sent: the prompt format as read for this request (a WebSocket message
    reads it again), so the worker needs no query for it."""
    return GenerationRequest(
        request_id=request_id,
        deployment=prepared.deployment.name,
        messages=prepared.conversation.messages(),
        sampling=prepared.params,
        prompt_format=prompt_format_of(prepared.deployment),
        prompt_ids=prepared.prompt_ids,
        tokenizer_digest=prepared.tokenizer_digest,
        knowledge_base=prepared.knowledge_base,
        cache_scope=cache_scope(prepared.user),
        tools=prepared.conversation.tools,
        sent_at=time.time(),
    )


def _enqueue(prepared: Prepared, request_id: str) -> None:
    """Into its user's line for the deployment's workers (fair turns: chat/concurrency.py)."""
    body = generation_request(prepared, request_id).to_wire()
    concurrency.enqueue(deployment=prepared.deployment, user_id=prepared.user.pk, request_id=request_id, body=body)


def store_and_enqueue(prepared: Prepared, request_id: str) -> None:
    """Store the request, hand the connection back to the pool, and queue the task: one call from
    the event loop (each call into sync code is a thread hop on the way to the first token)."""
    try:
        conversation = prepared.conversation
        lifecycle.record(
            request_id=request_id,
            user=prepared.user,
            token=prepared.token,
            deployment=prepared.deployment,
            protocol=prepared.protocol,
            prompt=conversation.prompt,
            system_prompt=conversation.system_prompt,
            history=conversation.history,
            params=prepared.params.as_dict(),
        )
    except DatabaseError as exc:
        raise ServerError(outage("The database is unavailable", exc)) from None
    release_connection()  # the request's last query before its stream
    try:
        _enqueue(prepared, request_id)
    except Exception as exc:
        try:
            lifecycle.fail(request_id, exc.message if isinstance(exc, RateLimited) else f"could not enqueue: {exc}")
        except DatabaseError:
            log.exception("could not mark %s failed", request_id)
        if isinstance(exc, RateLimited):
            raise
        raise ServerError(outage("The request could not be queued", exc)) from None


def release_connection() -> None:
    """Hand this thread's database connection back to the pool (outside a transaction only)."""
    if not connection.in_atomic_block:
        connection.close()


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


async def _take_a_slot(prepared: Prepared) -> concurrency.Slot:
    """A live worker, room in line for the user, then an in-flight slot. A Redis that failed over
    since this process last wrote refuses the first write (its connections then reconnect,
    llmsite.redis_outage): that refusal is tried again once, so that the request is not refused for it."""
    for last_try in (False, True):
        try:
            await wait_for_worker(prepared.deployment.queue)
            await concurrency.check_waiting(deployment=prepared.deployment, user_id=prepared.user.pk)
            return await concurrency.acquire(deployment=prepared.deployment)
        except redis_outage.FailedOver:  # refused, so not carried out: no slot taken
            if last_try:
                raise


async def dispatch(prepared: Prepared) -> Generation:
    """Take an in-flight slot (429 over the deployment's limit), take the request's listen lease,
    then store and enqueue it; its events are read from the stream's start."""
    try:
        with concerning(prepared.deployment.name):
            slot = await _take_a_slot(prepared)
    except ApiError:
        raise
    except Exception as exc:  # Redis unreachable
        raise Unavailable(outage("Redis is unavailable", exc)) from None
    request_id = str(uuid.uuid4())
    subscription = events.Subscription(request_id, listen=True)
    try:
        events.raise_if_cancelled()  # a cancel that one of the Redis commands above swallowed
        await subscription.open()
        await sync_to_async(store_and_enqueue)(prepared, request_id)
    except asyncio.CancelledError:  # the client left: its slot was held for the whole lease
        cancel_when_unheard(request_id, prepared.deployment.name)  # it may be stored all the same
        await subscription.close()
        await concurrency.give_back(slot)
        raise
    except Exception as exc:
        await subscription.close()
        await concurrency.give_back(slot)
        if isinstance(exc, ApiError):
            raise
        raise ServerError(outage("The request could not be queued", exc)) from None
    return Generation(request_id, subscription, prepared.token, slot=slot, deployment=prepared.deployment.name)


async def edge(func, /, **kwargs):
    """Run a sync service from async code; ApiErrors pass through, database and Redis outages become 503."""
    try:
        return await sync_to_async(func)(**kwargs)
    except ApiError:
        raise
    except DatabaseError as exc:
        raise Unavailable(outage("The database is unavailable", exc)) from None
    except redis_outage.AWAY as exc:
        raise Unavailable(outage("Redis is unavailable", exc)) from None
