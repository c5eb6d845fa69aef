"""The chat site's pages: the chat page and the list of a user's conversations."""

from urllib.parse import urlencode

from django.contrib import messages
from django.shortcuts import redirect, render
from django.urls import reverse
from django.views.decorators.http import require_POST

from chat import conversations, quotas
from llmsite.errors import InvalidRequest
from llmsite.pages import site_page
from knowledge import selectors as knowledge_selectors


@site_page
def home(request):
    """A new chat; the conversation is stored with its first message."""
    return _chat_page(request, None)


@site_page
def conversation(request, conversation_id):
    return _chat_page(request, conversations.access_conversation(user=request.user, conversation_id=conversation_id))


def _chat_page(request, conversation):
    deployments = list(conversations.chat_deployments())
    current = None
    if conversation is not None and conversation.deployment in deployments:
        current = conversation.deployment
    if current is None and deployments:
        current = next((d for d in deployments if d.name == "default"), deployments[0])
    sampling = conversations.deployment_defaults(current) if current else {}
    if conversation is not None and conversation.deployment == current:
        sampling.update(conversation.params or {})
    sampling = {name: format(value, "g") if isinstance(value, float) else value for name, value in sampling.items()}
    context = {
        "conversation": conversation,
        "messages_list": list(conversation.messages.all()) if conversation else [],
        "deployments": deployments,
        "current": current,
        "sampling": sampling,
        "system_prompt": conversation.system_prompt if conversation else "",
        "defaults": {d.name: conversations.deployment_defaults(d) for d in deployments},
        "recent": conversations.conversations_for(user=request.user)[:30],
        "knowledge_bases": knowledge_selectors.knowledge_bases_for(request.user).order_by("name"),
        "usage": quotas.summary(request.user),
    }
    return render(request, "chat/chat.html", context)


@site_page
def conversation_list(request):
    query = request.GET.get("q", "")
    items = conversations.conversations_for(user=request.user, query=query)
    return render(request, "chat/conversations.html", {"conversations": items, "query": query})


def _back_to_list(request):
    url = reverse("chat:conversations")
    query = request.POST.get("q", "")
    return redirect(f"{url}?{urlencode({'q': query})}" if query else url)


@require_POST
@site_page
def conversation_rename(request, conversation_id):
    conversation = conversations.access_conversation(user=request.user, conversation_id=conversation_id)
    try:
        conversations.conversation_rename(conversation=conversation, title=request.POST.get("title", ""))
        messages.success(request, f"Renamed to “{conversation.title}”.")
    except InvalidRequest as exc:
        messages.error(request, exc.message)
    return _back_to_list(request)


@require_POST
@site_page
def conversation_delete(request, conversation_id):
    conversation = conversations.access_conversation(user=request.user, conversation_id=conversation_id)
    title = conversation.title
    conversations.conversation_delete(conversation=conversation)
    messages.success(request, f"Deleted “{title}”.")
    return _back_to_list(request)
