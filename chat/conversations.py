"""The chat site's conversations: who may see which, storing turns, and the history a model gets.

Pages and the browser socket call these; errors are `llmsite.errors` domain errors (or Http404 for a
conversation that is not the caller's, so a stranger cannot tell it exists).
"""

import re
import uuid
from dataclasses import dataclass

from django.db import transaction
from django.db.models import Count, QuerySet
from django.http import Http404
from django.utils import timezone

from chat import services
from llmsite.errors import InvalidRequest, UnknownDeployment
from chat.generation import Conversation as Prompt
from llmsite.text import storable
from chat.models import Conversation, Deployment, Message
from chat.prompting import count_tokens, deployment_tokenizer, render_prompt
from chat.protocols.predict import PredictFields, fields_from_object

TITLE_MAX = Conversation._meta.get_field("title").max_length
TITLE_FROM_PROMPT = 60
# The sampling fields the chat page sends, stored per conversation.
SAMPLING_FIELDS = ("temperature", "top_p", "top_k", "repetition_penalty", "max_new_tokens")


# --- reading ----------------------------------------------------------------------------------


def conversations_for(*, user, query: str = "") -> QuerySet:
    """The user's conversations, most recently active first, optionally searched by title."""
    conversations = Conversation.objects.filter(user=user)
    query = query.replace("\x00", "").strip()  # PostgreSQL text cannot hold NUL: no title has one
    if query:
        conversations = conversations.filter(title__icontains=query)
    return (
        conversations.select_related("deployment")
        .annotate(message_count=Count("messages"))
        .order_by("-updated_at", "-created_at")
    )


def access_conversation(*, user, conversation_id) -> Conversation:
    """The conversation if it is `user`'s; 404 for anyone else's or an unknown id."""
    try:
        key = uuid.UUID(str(conversation_id))
    except ValueError:
        raise Http404("No such conversation.") from None
    conversation = Conversation.objects.select_related("deployment").filter(pk=key, user=user).first()
    if conversation is None:
        raise Http404("No such conversation.")
    return conversation


def chat_deployments() -> QuerySet:
    return Deployment.objects.defer("tokenizer_files").filter(enabled=True)


def chat_deployment(*, name: str) -> Deployment:
    name = str(name) if name else ""  # the chat socket's JSON may hold any type here
    deployment = chat_deployments().filter(name=name).first() if "\x00" not in name else None  # no name holds NUL
    if deployment is None:
        raise UnknownDeployment(name)
    return deployment


def deployment_defaults(deployment: Deployment) -> dict:
    return {
        "temperature": deployment.default_temperature,
        "top_p": deployment.default_top_p,
        "top_k": deployment.default_top_k,
        "repetition_penalty": 1.0,  # off: a deployment has no default of its own
        "max_new_tokens": deployment.default_max_new_tokens,
    }


# --- changing ---------------------------------------------------------------------------------


def title_from(prompt: str) -> str:
    text = re.sub(r"\s+", " ", prompt).strip()
    return text if len(text) <= TITLE_FROM_PROMPT else text[: TITLE_FROM_PROMPT - 1].rstrip() + "…"


def conversation_rename(*, conversation: Conversation, title: str) -> Conversation:
    title = re.sub(r"\s+", " ", title or "").strip()
    if not title:
        raise InvalidRequest("title: give the conversation a name.", param="title")
    if len(title) > TITLE_MAX:
        raise InvalidRequest(f"title: at most {TITLE_MAX} characters (got {len(title)}).", param="title")
    if "\x00" in title:
        raise InvalidRequest("title: must not contain NUL characters.", param="title")
    conversation.title = title
    conversation.save(update_fields=["title"])
    return conversation


def conversation_delete(*, conversation: Conversation) -> None:
    conversation.delete()


def chat_fields(data: dict) -> PredictFields:
    """The chat page's message as predict fields: the same validation and error names as the API."""
    if not isinstance(data, dict):
        raise InvalidRequest("The message must be a JSON object.", param="body")
    picked = {name: data.get(name) for name in ("prompt", "system_prompt", "knowledge_base", *SAMPLING_FIELDS)}
    if picked["knowledge_base"]:  # answers from a knowledge base use langchain retrieval, as on the API
        picked["langchain"] = True
    return fields_from_object({k: v for k, v in picked.items() if v is not None and v != ""})


@dataclass
class Turn:
    """One question about to be answered: the stored rows and what goes to the model."""

    conversation: Conversation
    question: Message
    answer: Message
    prepared: services.Prepared
    created: bool


def _answered_pairs(messages: list[Message]) -> list[list[str]]:
    """[question, answer] pairs of stored turns that got an answer (stopped answers count too)."""
    pairs, question = [], None
    for message in messages:
        if message.role == Message.Role.USER:
            question = message
        elif question is not None and message.status in (Message.Status.OK, Message.Status.CANCELLED) and message.content:
            pairs.append([question.content, message.content])
            question = None
    return pairs


def answer_reserve(*, context: int, max_new_tokens: int) -> int:
    """Tokens kept free for the answer when history is trimmed: what was asked, at most a quarter."""
    return max(1, min(max_new_tokens, context // 4))


def trim_history(*, deployment: Deployment, prompt: Prompt, max_new_tokens: int) -> Prompt:
    """Drop the oldest turns until the prompt leaves room for the answer in the model's context.

    Counts with the tokenizer the worker published; with none yet, the history is kept whole and
    the worker checks the length.
    """
    context = deployment.effective_context_length
    tokenizer = deployment_tokenizer(deployment)
    if tokenizer is None or not context or not prompt.history:
        return prompt
    budget = context - answer_reserve(context=context, max_new_tokens=max_new_tokens)

    def fits(kept: int) -> bool:
        candidate = Prompt(prompt.prompt, prompt.system_prompt, prompt.history[len(prompt.history) - kept :])
        text = render_prompt(tokenizer, candidate.messages(), deployment.chat_template, deployment.model_type)
        return count_tokens(tokenizer, text) <= budget

    # The newest turns are kept: find the most of them that fit (fewer turns never cost more).
    low, high = 0, len(prompt.history)
    while low < high:
        middle = (low + high + 1) // 2
        if fits(middle):
            low = middle
        else:
            high = middle - 1
    return Prompt(prompt.prompt, prompt.system_prompt, prompt.history[len(prompt.history) - low :])


@transaction.atomic
def turn_start(*, user, conversation_id=None, data: dict, regenerate: bool = False) -> Turn:
    """Store the question (or reuse the last one to regenerate) and prepare the model request.

    The history comes from the stored messages, trimmed to the deployment's context.
    """
    fields = chat_fields(data)
    # PostgreSQL text refuses NUL: the stored messages, which later turns' history comes from, and
    # what the model gets show it as U+FFFD.
    fields = fields.model_copy(update={"prompt": storable(fields.prompt), "system_prompt": storable(fields.system_prompt)})
    deployment = chat_deployment(name=data.get("deployment"))
    created = False
    if conversation_id:
        conversation = access_conversation(user=user, conversation_id=conversation_id)
        conversation = Conversation.objects.select_for_update().get(pk=conversation.pk)
    elif regenerate:
        raise InvalidRequest("There is no answer to regenerate yet.", param="conversation")
    else:
        if not (fields.prompt or "").strip():
            raise InvalidRequest("prompt: write a message first.", param="prompt")
        conversation = Conversation.objects.create(user=user, title=title_from(fields.prompt))
        created = True

    messages = list(conversation.messages.all())
    if regenerate:
        questions = [m for m in messages if m.role == Message.Role.USER]
        if not questions:
            raise InvalidRequest("There is no question to answer again.", param="conversation")
        question = questions[-1]
        Message.objects.filter(conversation=conversation, id__gt=question.id).delete()
        earlier = [m for m in messages if m.id < question.id]
        fields = fields.model_copy(update={"prompt": question.content})
    else:
        if not (fields.prompt or "").strip():
            raise InvalidRequest("prompt: write a message first.", param="prompt")
        question = Message.objects.create(conversation=conversation, role=Message.Role.USER, content=fields.prompt)
        earlier = messages

    prompt = Prompt(prompt=question.content, system_prompt=fields.system_prompt or "", history=_answered_pairs(earlier))
    sampling = services.sampling_for(deployment=deployment, fields=fields)
    prompt = trim_history(deployment=deployment, prompt=prompt, max_new_tokens=sampling.max_new_tokens)
    prepared = services.prepare(
        token=None, user=user, deployment=deployment, conversation=prompt, fields=fields, protocol="browser"
    )

    conversation.deployment = deployment
    conversation.knowledge_base_id = prepared.knowledge_base
    conversation.system_prompt = fields.system_prompt or ""
    conversation.params = {name: getattr(fields, name) for name in SAMPLING_FIELDS if getattr(fields, name) is not None}
    conversation.updated_at = timezone.now()
    conversation.save(update_fields=["deployment", "knowledge_base", "system_prompt", "params", "updated_at"])
    answer = Message.objects.create(conversation=conversation, role=Message.Role.ASSISTANT, status=Message.Status.STREAMING)
    return Turn(conversation, question, answer, prepared, created)


def answer_link(*, answer: Message, request_id: str) -> None:
    Message.objects.filter(pk=answer.pk).update(request_id=request_id)


def answer_finish(*, answer: Message, content: str, status: str, error: str = "", sources: list | None = None) -> Message:
    """Store how an answer ended: its text (also what a stopped answer had), status, error, sources."""
    answer.content, answer.status, answer.error, answer.sources = content, status, error, sources or []
    # A row deleted meanwhile (its conversation deleted in another tab) has nothing left to store.
    Message.objects.filter(pk=answer.pk).update(content=content, status=status, error=error, sources=answer.sources)
    return answer


def answer_settle(*, answer_id: int, content: str, status: str, error: str = "", sources: list | None = None) -> None:
    """Store the end a resumed view saw, for an answer its own socket never stored (that web
    process stopped mid-answer, or the database was away as it ended); only while the answer is
    still marked streaming, so that the socket which started it, where it lives on, has the last word."""
    Message.objects.filter(pk=answer_id, status=Message.Status.STREAMING).update(
        content=content, status=status, error=error, sources=sources or []
    )
