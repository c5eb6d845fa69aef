"""The audit log in the admin, read-only for everyone (superusers too): entries are filtered and
searched, never added, changed or deleted from the site (they leave after AUDIT_LOG_DAYS).

Also here: Django's own User and Group admins, registered again with AuditedAdmin so that changes
to users and groups (their permissions, per-user settings) are recorded; their behaviour is Django's.
"""

from django.contrib import admin
from django.contrib.auth import get_user_model
from django.contrib.auth.models import Group
from django.utils.html import format_html_join

from audit import changes
from audit.admin_mixins import AuditedAdmin
from audit.models import AuditEntry


@admin.register(AuditEntry)
class AuditEntryAdmin(admin.ModelAdmin):
    list_display = ["time", "action", "username", "address", "object_type", "object_text", "note"]
    list_filter = ["action", "time", ("user", admin.RelatedOnlyFieldListFilter), "object_type"]
    search_fields = ["username", "address", "object_type", "object_id", "object_text", "note"]
    date_hierarchy = "time"
    fields = ["time", "action", "user", "username", "address", "object_type", "object_id", "object_text", "what_changed", "note"]
    readonly_fields = fields
    list_per_page = 100

    @admin.display(description="changes")
    def what_changed(self, entry):
        return format_html_join("", "<div>{}</div>", ((line,) for line in changes.lines(entry.changes))) or "—"

    def has_add_permission(self, request):
        return False

    def has_change_permission(self, request, obj=None):
        return False

    def has_delete_permission(self, request, obj=None):
        return False


def audit_registered(*models) -> None:
    """Register each model's admin again with AuditedAdmin mixed in, keeping the admin class it had
    (Django's UserAdmin and GroupAdmin: django.contrib.auth comes before audit in INSTALLED_APPS,
    so its admin module registered them first)."""
    for model in models:
        if not admin.site.is_registered(model):
            continue
        current = type(admin.site.get_model_admin(model))
        if issubclass(current, AuditedAdmin):
            continue
        admin.site.unregister(model)
        admin.site.register(model, type(f"Audited{current.__name__}", (AuditedAdmin, current), {"__module__": __name__}))


audit_registered(get_user_model(), Group)
