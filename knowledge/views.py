"""The knowledge-base API: upload a document (multipart, token auth) and read its status."""

from django.conf import settings
from django.http import JsonResponse
from django.views.decorators.csrf import csrf_exempt

from audit import services as audit
from llmsite import auth
from llmsite.errors import ApiError, MethodNotAllowed
from knowledge import selectors, services
from knowledge.errors import BadUpload, FileTooLarge, ReadOnly

# Room for the multipart envelope around the file when the Content-Length is checked up front.
MULTIPART_OVERHEAD_BYTES = 64 * 1024


def _error(exc: ApiError) -> JsonResponse:
    return JsonResponse(exc.body(), status=exc.status)


def _the_file(request):
    limit = settings.KNOWLEDGE_MAX_UPLOAD_BYTES
    try:
        if int(request.META.get("CONTENT_LENGTH") or 0) > limit + MULTIPART_OVERHEAD_BYTES:
            raise FileTooLarge(None, limit)  # refused before the body is parsed
    except ValueError:
        pass
    if not request.content_type or not request.content_type.startswith("multipart/form-data"):
        raise BadUpload("Send the document as multipart/form-data with the file in the field 'file'.")
    files = request.FILES.getlist("file")
    if len(files) != 1:
        raise BadUpload(f"Send exactly one file in the field 'file' (got {len(files)}).")
    upload = files[0]
    services.check_upload(name=upload.name or "", size=upload.size)
    return upload


@csrf_exempt
def documents(request, knowledge_base: str):
    """`POST /api/knowledge/<kb>/documents`: store the file, queue its ingestion, answer at once."""
    try:
        token = auth.authenticate(header=request.headers.get("Authorization"))
        if request.method == "GET":
            kb = services.access_knowledge_base(user=token.user, name=knowledge_base)
            listed = kb.documents.defer("content").select_related("knowledge_base")
            return JsonResponse({"documents": [selectors.document_json(d) for d in listed]})
        if request.method != "POST":
            raise MethodNotAllowed(request.method)
        kb = services.access_knowledge_base(user=token.user, name=knowledge_base, change=True)
        upload = _the_file(request)
        document, created = services.document_upload(knowledge_base=kb, name=upload.name, data=upload.read(), uploaded_by=token.user)
    except ApiError as exc:
        return _error(exc)
    note = f"API token {token.prefix}…; knowledge base {kb.name}" + ("" if created else f"; already stored as {document.name}")
    audit.record(action=audit.Action.DOCUMENT_UPLOADED, request=request, user=token.user, obj=document, note=note)
    return JsonResponse({**selectors.document_json(document), "duplicate": not created}, status=202 if created else 200)


def document(request, knowledge_base: str, document_id: int):
    """`GET /api/knowledge/<kb>/documents/<id>`: status and progress (chunks done / total)."""
    try:
        token = auth.authenticate(header=request.headers.get("Authorization"))
        if request.method != "GET":
            raise ReadOnly(request.method)
        kb = services.access_knowledge_base(user=token.user, name=knowledge_base)
        found = services.access_document(knowledge_base=kb, document_id=document_id)
    except ApiError as exc:
        return _error(exc)
    return JsonResponse(selectors.document_json(found))
