"""Entries older than AUDIT_LOG_DAYS are forgotten: by `manage.py purge_audit`, and by the site
itself (the first entry a process records, then at most once an hour)."""

import uuid
from datetime import timedelta

from django.core.management import call_command
from django.utils import timezone

from audit import services
from audit.models import AuditEntry

Action = AuditEntry.Action


def _aged(days: int, tag: str) -> AuditEntry:
    return AuditEntry.objects.create(action=Action.LOGOUT, username=tag, time=timezone.now() - timedelta(days=days))


def test_purge_command_deletes_only_entries_older_than_the_setting(settings, capsys):
    settings.AUDIT_LOG_DAYS = 30
    tag = f"aged-{uuid.uuid4().hex[:8]}"
    old, recent = _aged(31, tag), _aged(29, tag)
    call_command("purge_audit")
    assert "older than 30 days" in capsys.readouterr().out
    assert list(AuditEntry.objects.filter(username=tag)) == [recent]
    assert not AuditEntry.objects.filter(pk=old.pk).exists()


def test_purge_command_takes_days_and_zero_keeps_everything(settings):
    tag = f"aged-{uuid.uuid4().hex[:8]}"
    old = _aged(400, tag)
    call_command("purge_audit", "--days", "0")
    assert AuditEntry.objects.filter(pk=old.pk).exists()
    call_command("purge_audit", "--days", "399")
    assert not AuditEntry.objects.filter(pk=old.pk).exists()


def test_recording_forgets_old_entries_at_most_once_an_hour(settings, monkeypatch):
    settings.AUDIT_LOG_DAYS = 365
    tag = f"aged-{uuid.uuid4().hex[:8]}"
    monkeypatch.setattr(services, "_last_purge", None)  # as in a process that has recorded nothing yet
    first = _aged(366, tag)
    services.record(action=Action.LOGOUT, username=tag)
    assert not AuditEntry.objects.filter(pk=first.pk).exists()

    second = _aged(366, tag)  # within the hour: kept until the next purge
    services.record(action=Action.LOGOUT, username=tag)
    assert AuditEntry.objects.filter(pk=second.pk).exists()
    assert AuditEntry.objects.filter(username=tag, time__gt=timezone.now() - timedelta(days=1)).count() == 2
