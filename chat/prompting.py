"""Rendering a conversation through the model's chat template, shared by web tier and worker.

A request's prompt is rendered, counted and checked against the context once, by `fit_prompt`:
in the web tier, with a tokenizer rebuilt from the files the worker published (no model is loaded
and torch is never imported here), which then sends the token ids; on the worker only where the
web tier could not (no tokenizer published yet) or where the worker changed the messages
(knowledge-base sources added).
"""

import hashlib
import json
import logging
import threading
from pathlib import Path

from django.conf import settings

log = logging.getLogger(__name__)


def render_prompt(tokenizer, messages: list[dict], chat_template: str = "", model_type: str = "auto", tools: list[dict] | None = None) -> str:
    """The model's prompt text for these messages, ready for the assistant's answer: rendered with
    the deployment's own template, else its model type's family template, else the tokenizer's.
    Tools (OpenAI function tools) and tool turns go through the template's own tool format where
    it has one; a template with none gets the calls as JSON text and no tool list."""
    from jinja2 import TemplateError

    from chat.chat_formats import template_for
    from chat.tools import plain_messages, tool_syntax
    from llmsite.errors import InvalidRequest

    template = template_for(model_type, chat_template)
    extra = {}
    if tools or any(m.get("tool_calls") or m.get("role") == "tool" for m in messages):
        if tool_syntax(template or getattr(tokenizer, "chat_template", None)):
            extra = {"tools": tools} if tools else {}
        else:
            messages = plain_messages(messages, tools)
    try:
        return tokenizer.apply_chat_template(messages, chat_template=template, tokenize=False, add_generation_prompt=True, **extra)
    except TemplateError as exc:  # e.g. a family whose format needs user and assistant turns to alternate
        raise InvalidRequest(f"The messages do not fit the model's chat format: {exc}", param="messages") from None


def fit_prompt(tokenizer, messages: list[dict], prompt_format, sampling, context_length: int | None = None, tools: list[dict] | None = None) -> list[int]:
    """The prompt's token ids; ContextTooLong where the context cannot hold them, and
    `sampling.max_new_tokens` capped to the room left after them. `context_length`: where the
    prompt format names none (the model's own)."""
    from llmsite.errors import ContextTooLong

    text = render_prompt(tokenizer, messages, prompt_format.chat_template, prompt_format.model_type, tools=tools)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]  # the template wrote any BOS it wants
    context = prompt_format.context_length or context_length
    if context:
        if len(ids) >= context:
            raise ContextTooLong(prompt_tokens=len(ids), context_length=context)
        sampling.max_new_tokens = min(sampling.max_new_tokens, context - len(ids))
    return ids


def count_tokens(tokenizer, text: str) -> int:
    # The template already wrote any special tokens (BOS) it wants into the text.
    return len(tokenizer(text, add_special_tokens=False)["input_ids"])


_cache: dict[str, object] = {}
_digests: dict[int, str] = {}  # id(tokenizer) -> the digest of the files it was built from
_lock = threading.Lock()


def tokenizer_digest(tokenizer) -> str:
    """The digest of the published files an edge tokenizer was rebuilt from ("" if unknown)."""
    return _digests.get(id(tokenizer), "")


def files_digest(files: dict) -> str:
    return hashlib.sha256(json.dumps(files, sort_keys=True).encode()).hexdigest()[:16]


def edge_tokenizer(files: dict):
    """A fast tokenizer rebuilt from a deployment's published files, cached by their digest."""
    if not files:
        return None
    digest = files_digest(files)
    with _lock:
        if digest in _cache:
            return _cache[digest]
        from transformers import PreTrainedTokenizerFast  # no torch behind this import

        folder = Path(settings.DATA_DIR) / "tokenizers" / digest
        folder.mkdir(parents=True, exist_ok=True)
        for name, text in files.items():
            (folder / Path(name).name).write_text(text)
        try:
            tokenizer = PreTrainedTokenizerFast.from_pretrained(str(folder))
        except Exception:  # a tokenizer kind the fast class cannot rebuild: the worker checks instead
            log.exception("cannot rebuild the tokenizer in the web tier; the worker will check lengths")
            tokenizer = None
        _cache[digest] = tokenizer
        if tokenizer is not None:
            _digests[id(tokenizer)] = digest
        return tokenizer


_by_deployment: dict[int, tuple] = {}


def deployment_tokenizer(deployment):
    """A deployment's edge tokenizer, its files read from the database only when they may have
    changed (a worker writes them with a new status_updated_at, the admin saves a new updated_at)."""
    if "tokenizer_files" not in deployment.get_deferred_fields():
        return edge_tokenizer(deployment.tokenizer_files)  # given in full (an unsaved deployment)
    version = (deployment.status_updated_at, deployment.updated_at)
    cached = _by_deployment.get(deployment.pk)
    if cached is not None and cached[0] == version:
        return cached[1]
    files = type(deployment).objects.filter(pk=deployment.pk).values_list("tokenizer_files", flat=True).first()
    tokenizer = edge_tokenizer(files or {})
    _by_deployment[deployment.pk] = (version, tokenizer)
    return tokenizer
