"""The knowledge-base pages (session login): list and create, upload by drag and drop, delete.

Thin views over knowledge.services; the page polls `documents.json` for status and progress.
"""

from django.contrib import messages
from django.http import JsonResponse
from django.shortcuts import redirect, render
from django.views.decorators.http import require_GET, require_POST

from audit import services as audit
from llmsite.errors import ApiError
from llmsite.pages import site_page
from knowledge import selectors, services
from knowledge.errors import BadUpload


def _documents(kb):
    return kb.documents.defer("content").select_related("knowledge_base").order_by("-created_at", "-pk")


@site_page
def knowledge_list(request):
    if request.method == "POST":
        try:
            kb = services.knowledge_base_create(name=request.POST.get("name", ""), owner=request.user)
        except ApiError as exc:
            messages.error(request, exc.message)
        else:
            return redirect("knowledge:page", name=kb.name)
    bases = selectors.knowledge_bases_for(request.user).select_related("owner").order_by("name")
    return render(request, "knowledge/list.html", {"bases": bases})


@site_page
def knowledge_page(request, name):
    kb = services.knowledge_base_for_page(user=request.user, name=name)
    context = {"kb": kb, "documents": _documents(kb), "may_change": selectors.may_change(request.user, kb)}
    return render(request, "knowledge/detail.html", context)


@require_GET
@site_page
def documents_json(request, name):
    kb = services.knowledge_base_for_page(user=request.user, name=name)
    return JsonResponse({"documents": [selectors.document_json(d) for d in _documents(kb)]})


@require_POST
@site_page
def upload(request, name):
    """One or more files from the form or the drop zone; JSON for the page's script, else a redirect."""
    kb = services.knowledge_base_for_page(user=request.user, name=name)
    results = []
    try:
        services.access_knowledge_base(user=request.user, name=kb.name, change=True)
        files = request.FILES.getlist("file")
        if not files:
            raise BadUpload("Choose a file to upload.")
        for upload in files:
            services.check_upload(name=upload.name or "", size=upload.size)
            document, created = services.document_upload(knowledge_base=kb, name=upload.name, data=upload.read(), uploaded_by=request.user)
            note = f"page; knowledge base {kb.name}" + ("" if created else f"; already stored as {document.name}")
            audit.record(action=audit.Action.DOCUMENT_UPLOADED, request=request, obj=document, note=note)
            results.append(selectors.document_json(document))
    except ApiError as exc:
        if request.headers.get("Accept") == "application/json":
            return JsonResponse({"error": exc.message, "documents": results}, status=exc.status)
        messages.error(request, exc.message)
    if request.headers.get("Accept") == "application/json":
        return JsonResponse({"documents": results})
    return redirect("knowledge:page", name=kb.name)


@require_POST
@site_page
def document_delete(request, name, document_id):
    kb = services.knowledge_base_for_page(user=request.user, name=name)
    try:
        document = services.access_document(knowledge_base=kb, document_id=document_id)
        target = audit.describe(document)  # the row's id goes with it
        services.document_delete(user=request.user, document=document)
        audit.record(action=audit.Action.DOCUMENT_DELETED, request=request, obj=target, note=f"page; knowledge base {kb.name}")
        messages.success(request, f"Deleted “{document.name}”.")
    except ApiError as exc:
        messages.error(request, exc.message)
    return redirect("knowledge:page", name=kb.name)
