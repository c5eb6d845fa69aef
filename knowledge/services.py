"""Changes to knowledge bases: create, upload, ingest (parse, split, embed, store), and grounding.

Ingestion is at least once and idempotent (DESIGN.md): a document is keyed by its sha256 within
its knowledge base, and its chunks are replaced in one transaction when it becomes ready, so a
re-delivered task or a re-upload never duplicates chunks and a failure leaves none behind.
"""

import hashlib
import logging
from collections.abc import Callable

from django.conf import settings
from django.core.exceptions import ValidationError
from django.db import IntegrityError, close_old_connections, transaction
from django.http import Http404

from llmsite import producer
from llmsite.errors import Forbidden, InvalidRequest
from knowledge import parsing, selectors
from knowledge.errors import BadUpload, FileTooLarge, UnknownDocument, UnknownKnowledgeBase
from knowledge.models import Chunk, Document, KnowledgeBase

log = logging.getLogger(__name__)

EMBED_BATCH = 32


# --- knowledge bases ------------------------------------------------------------------------


def knowledge_base_get_or_create(*, name: str, owner) -> tuple[KnowledgeBase, bool]:
    kb = KnowledgeBase(name=name, owner=owner)
    kb.full_clean(exclude=["owner"], validate_unique=False)
    return KnowledgeBase.objects.get_or_create(name=name, defaults={"owner": owner})


def access_knowledge_base(*, user, name: str, change: bool = False) -> KnowledgeBase:
    """The knowledge base `name` if `user` may use it (or change it): 404 unknown or not the user's
    to see (a stranger cannot tell that it exists), 403 seen but not the user's to change."""
    kb = KnowledgeBase.objects.filter(name=name).first() if "\x00" not in name else None  # no name holds NUL
    if kb is None or not selectors.may_use(user, kb):
        raise UnknownKnowledgeBase(name)
    if change and not selectors.may_change(user, kb):
        raise Forbidden(f"Only the owner of the knowledge base '{name}' may add documents to it.", param="knowledge_base")
    return kb


def knowledge_base_for_request(*, user, name: str) -> KnowledgeBase:
    """The knowledge base a predict request names; any refusal is a 400 naming `knowledge_base`."""
    kb = KnowledgeBase.objects.filter(name=name).first() if "\x00" not in name else None
    if kb is None or not selectors.may_use(user, kb):
        raise InvalidRequest(f"There is no knowledge base named '{name}' that you may use.", param="knowledge_base")
    return kb


def access_document(*, knowledge_base: KnowledgeBase, document_id) -> Document:
    try:
        return Document.objects.defer("content").get(pk=int(document_id), knowledge_base=knowledge_base)
    except (Document.DoesNotExist, ValueError, TypeError):
        raise UnknownDocument(document_id, knowledge_base.name) from None


# --- documents ------------------------------------------------------------------------------


def check_upload(*, name: str, size: int) -> None:
    """Refuse what can be refused before storing anything: type, emptiness, size."""
    limit = settings.KNOWLEDGE_MAX_UPLOAD_BYTES
    if not name or len(name) > 255:
        raise BadUpload("The file needs a name of 1 to 255 characters, with its extension.")
    kind = parsing.file_type(name)
    if kind not in parsing.SUPPORTED_TYPES:
        supported = ", ".join("." + t for t in parsing.SUPPORTED_TYPES)
        raise BadUpload(f"Unsupported file type '{'.' + kind if kind else name}': use one of {supported}.")
    if size == 0:
        raise BadUpload(f"The file '{name}' is empty.")
    if size > limit:
        raise FileTooLarge(size, limit)


@transaction.atomic
def document_create(*, knowledge_base: KnowledgeBase, name: str, data: bytes, uploaded_by=None) -> tuple[Document, bool]:
    """Store an upload (not yet ingested); the same bytes again return the existing document."""
    # The name is only a label (the bytes are stored in the database, under the row's id): keep
    # what follows the last path separator, without control characters such as NUL.
    name = "".join(c for c in name if c.isprintable()).rsplit("/", 1)[-1].rsplit("\\", 1)[-1].strip()
    if name in (".", ".."):
        name = ""
    check_upload(name=name, size=len(data))
    try:
        parsing.check_content(name, data)
    except parsing.ParseError as exc:
        raise BadUpload(f"{name}: {exc}") from None
    digest = hashlib.sha256(data).hexdigest()
    existing = Document.objects.defer("content").filter(knowledge_base=knowledge_base, sha256=digest).first()
    if existing is not None:
        return existing, False
    try:
        with transaction.atomic():
            document = Document.objects.create(
                knowledge_base=knowledge_base,
                name=name,
                file_type=parsing.file_type(name),
                size=len(data),
                sha256=digest,
                content=data,
                uploaded_by=uploaded_by,
            )
    except IntegrityError:  # the same file uploaded twice at once: one row wins
        return Document.objects.defer("content").get(knowledge_base=knowledge_base, sha256=digest), False
    return document, True


def enqueue_ingestion(document_id: int) -> None:
    producer.send(producer.INGEST_TASK, queue=settings.EMBEDDING_QUEUE, kwargs={"document_id": document_id})


def document_upload(*, knowledge_base: KnowledgeBase, name: str, data: bytes, uploaded_by=None) -> tuple[Document, bool]:
    """Store an upload and queue its ingestion on a worker; returns at once."""
    with transaction.atomic():
        document, created = document_create(knowledge_base=knowledge_base, name=name, data=data, uploaded_by=uploaded_by)
        if created:
            transaction.on_commit(lambda: enqueue_ingestion(document.pk))
        elif document.status == Document.Status.FAILED:
            document_reingest(document=document)  # the same file again: try once more
            document.refresh_from_db(fields=["status", "error", "chunks_done"])
    return document, created


def document_reingest(*, document: Document) -> None:
    """Queue a document's ingestion again (admin action); its chunks are replaced when it is ready."""
    Document.objects.filter(pk=document.pk).update(status=Document.Status.QUEUED, error="", chunks_done=0)
    transaction.on_commit(lambda: enqueue_ingestion(document.pk))


def _set(document_id: int, **fields) -> None:
    Document.objects.filter(pk=document_id).update(**fields)


def document_fail(*, document_id: int, reason: str) -> None:
    with transaction.atomic():
        Chunk.objects.filter(document_id=document_id).delete()
        _set(document_id, status=Document.Status.FAILED, error=reason, chunks_done=0)


def document_ingest(
    *,
    document_id: int,
    embed: Callable[[list[str]], list[list[float]]],
    progress: Callable[[int, int], None] | None = None,
) -> Document | None:
    """Parse, split, embed and store one document; ends `ready`, or `failed` with the reason.

    Runs on a worker (task workers.ingest_document) or in `manage.py ingest --in-process`, each of
    which passes its `embed(texts) -> vectors`; `progress(done, total)` is called after each batch.
    """
    document = Document.objects.select_related("knowledge_base").filter(pk=document_id).first()
    if document is None:
        log.warning("document %s is gone; nothing to ingest", document_id)
        return None
    if document.status == Document.Status.READY:
        return document  # a re-delivered task: the chunks are already stored
    kb = document.knowledge_base
    try:
        _set(document_id, status=Document.Status.PARSING, error="", chunks_done=0)
        sections = parsing.parse(document.name, bytes(document.content))
        pieces = parsing.split(sections, chunk_size=kb.chunk_size, chunk_overlap=kb.chunk_overlap)
        if not pieces:
            raise parsing.ParseError("The file contains no text.")
        total = len(pieces)
        _set(document_id, status=Document.Status.EMBEDDING, chunks_total=total)
        vectors = []
        for start in range(0, total, EMBED_BATCH):
            vectors.extend(embed([p.text for p in pieces[start : start + EMBED_BATCH]]))
            _set(document_id, chunks_done=len(vectors))
            if progress is not None:
                progress(len(vectors), total)
        with transaction.atomic():
            # Two runs of one document (a redelivered task) store one after the other, never mixed.
            Document.objects.select_for_update().filter(pk=document_id).first()
            Chunk.objects.filter(document_id=document_id).delete()
            Chunk.objects.bulk_create(
                [
                    Chunk(document_id=document_id, knowledge_base=kb, index=i, text=p.text, heading=p.heading, page=p.page, embedding=v)
                    for i, (p, v) in enumerate(zip(pieces, vectors))
                ],
                batch_size=500,
            )
            _set(document_id, status=Document.Status.READY, chunks_total=total, chunks_done=total, error="")
    except parsing.ParseError as exc:
        document_fail(document_id=document_id, reason=str(exc))
    except Exception as exc:
        log.exception("ingestion of document %s failed", document_id)
        close_old_connections()
        document_fail(document_id=document_id, reason=f"Ingestion failed: {type(exc).__name__}: {exc}")
    return Document.objects.defer("content").get(pk=document_id)


# --- grounding (on the worker) --------------------------------------------------------------

# The context comes first and the instruction right before the question: small models follow the
# instruction nearest the question far better than one placed before a long context.
INSTRUCTION = (
    "Answer the question using only the context above. Copy names, numbers and codes exactly as the "
    "context writes them. If the context does not hold the answer, say that you do not know."
)


def retrieve(*, knowledge_base_id: int, question: str, embed_question: Callable[[str], list[float]], k: int | None = None):
    """The knowledge base's top chunks for a question (hybrid search), best first."""
    kb = KnowledgeBase.objects.get(pk=knowledge_base_id)
    return selectors.search_chunks(
        knowledge_base_id=kb.pk, question=question, vector=embed_question(question), k=k or kb.retrieval_k
    )


def grounded_prompt(question: str, hits: list) -> str:
    """The user turn that carries the retrieved chunks, each labelled with its file."""
    if not hits:
        return question
    blocks = [f"[{n}] From {hit.chunk.document.name}:\n{hit.chunk.text}" for n, hit in enumerate(hits, start=1)]
    return "Context:\n" + "\n\n".join(blocks) + f"\n\n{INSTRUCTION}\n\nQuestion: {question}"


# --- the knowledge-base pages (session users) -------------------------------------------------


def knowledge_base_for_page(*, user, name: str) -> KnowledgeBase:
    """The knowledge base if `user` may use it; a stranger gets 404 so cannot tell that it exists."""
    kb = KnowledgeBase.objects.filter(name=name).first()
    if kb is None or not selectors.may_use(user, kb):
        raise Http404("No such knowledge base.")
    return kb


def knowledge_base_create(*, name: str, owner) -> KnowledgeBase:
    """A new knowledge base named `name`; an error naming `name` when it is taken or malformed."""
    name = (name or "").strip()
    try:
        kb, created = knowledge_base_get_or_create(name=name, owner=owner)
    except ValidationError as exc:
        messages = [m for field in exc.message_dict.values() for m in field]
        raise InvalidRequest(f"name: {' '.join(messages)}", param="name") from None
    if not created:
        raise InvalidRequest(f"name: a knowledge base named '{name}' already exists.", param="name")
    return kb


def document_delete(*, user, document: Document) -> None:
    """Delete a document and its chunks (cascade); only the knowledge base's owner or a superuser."""
    if not selectors.may_change(user, document.knowledge_base):
        raise Forbidden(f"Only the owner of the knowledge base '{document.knowledge_base.name}' may delete its documents.", param="document")
    document.delete()
