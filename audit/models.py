"""The audit log: who did what, when, from where; written by audit.services, never edited."""

from django.conf import settings
from django.core.serializers.json import DjangoJSONEncoder
from django.db import models
from django.utils import timezone


class AuditEntry(models.Model):
    """One action. The username is kept as text, so an entry still names a user who was deleted."""

    class Action(models.TextChoices):
        LOGIN = "login", "login"
        LOGIN_FAILED = "login_failed", "login failed"
        LOGOUT = "logout", "logout"
        TOKEN_CREATED = "token_created", "API token created"
        TOKEN_REVOKED = "token_revoked", "API token revoked"
        ADMIN_ADDED = "admin_added", "added in the admin"
        ADMIN_CHANGED = "admin_changed", "changed in the admin"
        ADMIN_DELETED = "admin_deleted", "deleted in the admin"
        DOCUMENT_UPLOADED = "document_uploaded", "document uploaded"
        DOCUMENT_DELETED = "document_deleted", "document deleted"

    time = models.DateTimeField(default=timezone.now, db_index=True)
    user = models.ForeignKey(settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL, related_name="+")
    username = models.CharField(max_length=150, blank=True, help_text="The user's name then (for a failed login: the name tried).")
    address = models.GenericIPAddressField(null=True, blank=True, help_text="The client's address; empty for a command.")
    action = models.CharField(max_length=32, choices=Action.choices, db_index=True)
    object_type = models.CharField(max_length=100, blank=True, help_text="app.model of what the action touched.")
    object_id = models.CharField(max_length=64, blank=True)
    object_text = models.CharField(max_length=200, blank=True)
    changes = models.JSONField(
        default=dict, blank=True, encoder=DjangoJSONEncoder, help_text='field: [old, new]; secrets show as "changed".'
    )
    note = models.CharField(max_length=200, blank=True)

    class Meta:
        ordering = ["-time", "-pk"]
        verbose_name_plural = "audit entries"

    def __str__(self):
        return f"{self.time:%Y-%m-%d %H:%M:%S} {self.action} {self.username or '-'}"
