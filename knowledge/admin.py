from django import forms
from django.contrib import admin, messages
from django.core.exceptions import ValidationError
from django.db.models import Count

from audit import services as audit
from audit.admin_mixins import AuditedAdmin
from llmsite.errors import ApiError
from knowledge import services
from knowledge.models import Document, KnowledgeBase


@admin.register(KnowledgeBase)
class KnowledgeBaseAdmin(AuditedAdmin, admin.ModelAdmin):
    list_display = ["name", "owner", "document_count", "chunk_size", "chunk_overlap", "retrieval_k", "created_at"]
    search_fields = ["name", "owner__username"]
    filter_horizontal = ["shared_with"]
    readonly_fields = ["embedding_model", "created_at"]

    def get_queryset(self, request):
        return super().get_queryset(request).annotate(documents_count=Count("documents"))

    @admin.display(description="documents", ordering="documents_count")
    def document_count(self, obj):
        return obj.documents_count


class DocumentUploadForm(forms.ModelForm):
    """The admin's way in: pick a knowledge base and a file; ingestion is queued on a worker."""

    upload = forms.FileField(help_text="A .txt, .md, .docx or .pdf file.")

    class Meta:
        model = Document
        fields = ["knowledge_base"]

    def clean_upload(self):
        upload = self.cleaned_data["upload"]
        try:
            services.check_upload(name=upload.name or "", size=upload.size)
        except ApiError as exc:
            raise ValidationError(exc.message) from None
        return upload


@admin.register(Document)
class DocumentAdmin(AuditedAdmin, admin.ModelAdmin):
    list_display = ["name", "knowledge_base", "status", "progress", "error", "size", "updated_at"]
    list_filter = ["status", "knowledge_base"]
    search_fields = ["name", "sha256"]
    readonly_fields = [
        "knowledge_base", "name", "file_type", "size", "sha256", "status", "error",
        "chunks_done", "chunks_total", "uploaded_by", "created_at", "updated_at",
    ]  # fmt: skip
    actions = ["reingest"]
    audit_added_action = None  # save_model records the upload (document_uploaded)
    audit_deleted_action = audit.Action.DOCUMENT_DELETED

    def get_queryset(self, request):
        return super().get_queryset(request).defer("content")

    def get_form(self, request, obj=None, **kwargs):
        if obj is None:
            kwargs["form"] = DocumentUploadForm
        return super().get_form(request, obj, **kwargs)

    def get_readonly_fields(self, request, obj=None):
        return self.readonly_fields if obj is not None else []

    def get_fields(self, request, obj=None):
        return ["knowledge_base", "upload"] if obj is None else self.readonly_fields

    @admin.display(description="chunks done / total")
    def progress(self, obj):
        return f"{obj.chunks_done} / {obj.chunks_total}"

    def save_model(self, request, obj, form, change):
        if change:
            return
        upload = form.cleaned_data["upload"]
        document, created = services.document_upload(
            knowledge_base=form.cleaned_data["knowledge_base"], name=upload.name, data=upload.read(), uploaded_by=request.user
        )
        obj.pk = document.pk
        obj._state.adding = False
        kb_name = form.cleaned_data["knowledge_base"].name
        note = f"admin; knowledge base {kb_name}" + ("" if created else f"; already stored as {document.name}")
        audit.record(action=audit.Action.DOCUMENT_UPLOADED, request=request, obj=document, note=note)
        if not created:
            messages.warning(request, f"This file is already in the knowledge base as '{document.name}'.")

    def save_related(self, request, form, formsets, change):
        pass  # the document has no relations to edit; save_model stored it through the service

    @admin.action(description="Re-ingest the selected documents")
    def reingest(self, request, queryset):
        for document in queryset:
            services.document_reingest(document=document)
            audit.record(
                action=audit.Action.ADMIN_CHANGED, request=request, obj=document,
                changes={"status": [document.status, "queued"]}, note="re-ingest",
            )  # fmt: skip
        self.message_user(request, f"Queued {queryset.count()} document(s) for ingestion.")
