from asgiref.sync import async_to_sync
from django.conf import settings
from django.contrib import admin, messages
from django.db.models import Count, Sum

from audit.admin_mixins import AuditedAdmin
from audit.services import Action
from chat import probes
from chat.models import ApiToken, Conversation, Deployment, Message, Quota, RequestLog, StoredResponse
from chat.tokens import token_create, token_revoke


# what a saved change does to the workers already serving the deployment (workers/reload.py)
RELOAD_NOTE = (
    "Workers serving this deployment load a changed model source, model type, engine, precision, "
    "remote-code switch or batch size (and context length, for llama.cpp and vLLM) within seconds, the "
    "old model answering until the new one is ready (where the GPUs lack room for both, the old one "
    "closes first, its answers running to their end, and requests wait for the new one); disabling it "
    "unloads it, enabling it loads it."
)


@admin.register(Deployment)
class DeploymentAdmin(AuditedAdmin, admin.ModelAdmin):
    list_display = ["name", "model_source", "model_type", "engine", "precision", "queue", "enabled", "status", "status_updated_at"]
    list_filter = ["enabled", "status", "engine"]
    search_fields = ["name", "model_source"]
    readonly_fields = ["status", "status_detail", "status_updated_at", "model_context_length", "created_at", "updated_at"]
    fieldsets = [
        (None, {"fields": ["name", "enabled", "model_source", "model_type", "chat_template"]}),
        (
            "Serving",
            {
                "fields": ["engine", "precision", "trust_remote_code", "context_length", "queue", "max_batch_size", "max_concurrent_generations", "max_waiting_per_user"],
                "description": RELOAD_NOTE,
            },
        ),
        ("Answers from documents (langchain: true)", {"fields": ["default_knowledge_base"]}),
        (
            "Default sampling",
            {
                "fields": [
                    "default_max_new_tokens",
                    "default_temperature",
                    "default_top_k",
                    "default_top_p",
                    "default_do_sample",
                ]
            },
        ),
        ("Worker status", {"fields": readonly_fields}),
    ]
    actions = ["check_worker"]

    @admin.action(description="Check that the worker answers")
    def check_worker(self, request, queryset):
        results = async_to_sync(probes.deployments_check)(
            deployments=list(queryset), user=request.user, timeout=settings.DEPLOYMENT_CHECK_TIMEOUT_SECONDS
        )
        for answered, text in results:
            self.message_user(request, text, messages.SUCCESS if answered else messages.ERROR)


@admin.register(ApiToken)
class ApiTokenAdmin(AuditedAdmin, admin.ModelAdmin):
    list_display = ["prefix", "user", "name", "requests_per_minute", "tokens_per_minute", "created_at", "last_used_at", "revoked_at"]
    list_filter = ["revoked_at"]
    search_fields = ["user__username", "name", "prefix"]
    fields = ["user", "name", "deployments", "requests_per_minute", "tokens_per_minute", "revoked_at"]
    filter_horizontal = ["deployments"]
    actions = ["revoke"]
    audit_added_action = None  # token_create records the new token (token_created)

    def save_model(self, request, obj, form, change):
        if change:
            return super().save_model(request, obj, form, change)
        token, raw = token_create(
            user=obj.user,
            name=obj.name,
            deployments=list(form.cleaned_data.get("deployments") or []),
            requests_per_minute=obj.requests_per_minute,
            tokens_per_minute=obj.tokens_per_minute,
            request=request,
        )
        obj.pk, obj.prefix, obj.digest, obj.created_at = token.pk, token.prefix, token.digest, token.created_at
        obj._state.adding = False
        messages.warning(request, f"The new token (shown only this once): {raw}")

    def audit_action_for_change(self, obj, changes):
        revoked_at = changes.get("revoked_at")
        revoked = isinstance(revoked_at, list) and revoked_at[0] is None and revoked_at[1] is not None
        return Action.TOKEN_REVOKED if revoked else super().audit_action_for_change(obj, changes)

    @admin.action(description="Revoke the selected tokens")
    def revoke(self, request, queryset):
        count = token_revoke(tokens=queryset, request=request)
        self.message_user(request, f"Revoked {count} token(s).")


@admin.register(RequestLog)
class RequestLogAdmin(AuditedAdmin, admin.ModelAdmin):
    list_display = ["id", "queued_at", "user", "deployment", "protocol", "status", "prompt_tokens", "cached_tokens", "completion_tokens"]
    list_filter = ["status", "deployment", "protocol", "user"]
    search_fields = ["id", "prompt", "response"]
    date_hierarchy = "queued_at"
    readonly_fields = [f.name for f in RequestLog._meta.fields]
    audit_deleted_values = False  # prompts and answers do not outlive their rows in the audit log

    def has_add_permission(self, request):
        return False

    def changelist_view(self, request, extra_context=None):
        response = super().changelist_view(request, extra_context)
        try:
            queryset = response.context_data["cl"].queryset
            totals = queryset.aggregate(
                count=Count("id"), prompt=Sum("prompt_tokens"), cached=Sum("cached_tokens"), completion=Sum("completion_tokens")
            )
            response.context_data["title"] = (
                f"Stored requests — {totals['count']} requests, {totals['prompt'] or 0} prompt tokens "
                f"({totals['cached'] or 0} of them cached) and {totals['completion'] or 0} completion tokens"
            )
        except (AttributeError, KeyError):
            pass
        return response


class MessageInline(admin.TabularInline):
    model = Message
    fields = ["role", "status", "content", "error", "request", "created_at"]
    readonly_fields = fields
    extra = 0
    can_delete = False


@admin.register(Conversation)
class ConversationAdmin(AuditedAdmin, admin.ModelAdmin):
    list_display = ["title", "user", "deployment", "created_at", "updated_at"]
    list_filter = ["deployment"]
    search_fields = ["title", "user__username"]
    readonly_fields = ["user", "deployment", "params", "created_at", "updated_at"]
    fields = ["title", "user", "deployment", "system_prompt", "params", "created_at", "updated_at"]
    inlines = [MessageInline]
    audit_deleted_values = False  # a user's content does not outlive its row in the audit log


@admin.register(StoredResponse)
class StoredResponseAdmin(AuditedAdmin, admin.ModelAdmin):
    """The Responses API's stored responses (read-only: they are the users' own)."""

    list_display = ["id", "user", "model", "status", "previous_response_id", "created_at"]
    list_filter = ["status", "model"]
    search_fields = ["id", "user__username", "previous_response_id"]
    date_hierarchy = "created_at"
    readonly_fields = [f.name for f in StoredResponse._meta.fields]
    audit_deleted_values = False  # a user's content does not outlive its row in the audit log

    def has_add_permission(self, request):
        return False

    def has_change_permission(self, request, obj=None):
        return False


@admin.register(Quota)
class QuotaAdmin(AuditedAdmin, admin.ModelAdmin):
    """Token budgets per user or per group; blank falls through (user, groups, the site's
    QUOTA_TOKENS_PER_DAY / _MONTH), 0 is no limit; of several groups the most generous counts."""

    list_display = ["__str__", "user", "group", "tokens_per_day", "tokens_per_month"]
    list_filter = ["group"]
    search_fields = ["user__username", "group__name"]
    fields = ["user", "group", "tokens_per_day", "tokens_per_month"]
    autocomplete_fields = ["user", "group"]
