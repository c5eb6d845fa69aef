"""What changed in an object: its editable fields before and after, as {field: [old, new]}.

Secrets never enter an entry: a field named in SECRET_FIELDS (a password hash, a token's digest)
shows as "changed" when it did. Values are compared whole and cut to MAX_VALUE_CHARS when stored.
"""

import json
import math
from datetime import datetime

from django.core.serializers.json import DjangoJSONEncoder
from django.db import models

SECRET_FIELDS = frozenset({"password", "digest", "secret", "secret_key", "api_key"})
MAX_VALUE_CHARS = 1000
CHANGED = "changed"


def _plain(value):
    """A JSON-friendly form of a field's value: related objects by their text."""
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    if isinstance(value, models.Model):
        return str(value)
    if isinstance(value, datetime):
        # To the second, as the admin's forms show and send them (a save there drops the rest).
        return value.isoformat(sep=" ", timespec="seconds")
    if isinstance(value, (dict, list)):
        return json.loads(json.dumps(value, cls=DjangoJSONEncoder))
    if isinstance(value, (bytes, memoryview)):
        return f"<{len(value)} bytes>"
    return str(value)


def snapshot(obj) -> dict:
    """The editable fields (what the admin can change) of a saved object, many-to-many included."""
    if obj is None:
        return {}
    values = {}
    for field in obj._meta.concrete_fields:
        if field.primary_key or not field.editable:
            continue
        values[field.name] = _plain(getattr(obj, field.name))
    if obj.pk is not None:
        for field in obj._meta.many_to_many:
            if field.editable:
                values[field.name] = sorted(str(related) for related in getattr(obj, field.name).all())
    return values


def fresh(obj):
    """The object as stored now (None if it is gone), reading only what a snapshot needs."""
    fields = [f.name for f in obj._meta.concrete_fields if f.primary_key or f.editable]
    return type(obj)._default_manager.filter(pk=obj.pk).only(*fields).first() if obj.pk is not None else None


def diff(before: dict, after: dict, secret=SECRET_FIELDS) -> dict:
    """{field: [old, new]} for every field that differs. Added objects (before = {}) list what they
    were given; deleted ones (after = {}) what they held, without their secrets."""
    changes = {}
    for name in list(before) + [n for n in after if n not in before]:
        old, new = before.get(name), after.get(name)
        if old == new or (not before and new in (None, "", [])):
            continue
        if name in secret:
            if after:
                changes[name] = CHANGED
            continue
        changes[name] = [old, new]
    return changes


def _cut(value):
    if isinstance(value, str) and len(value) > MAX_VALUE_CHARS:
        return value[:MAX_VALUE_CHARS] + "…"
    if isinstance(value, (dict, list)):
        text = json.dumps(value, cls=DjangoJSONEncoder)
        return value if len(text) <= MAX_VALUE_CHARS else text[:MAX_VALUE_CHARS] + "…"
    return value


def stored(changes: dict) -> dict:
    """The changes as an entry keeps them: each old and new value cut to MAX_VALUE_CHARS."""
    kept = {}
    for name, change in changes.items():
        if isinstance(change, (list, tuple)) and len(change) == 2:
            kept[str(name)] = [_cut(_plain(change[0])), _cut(_plain(change[1]))]
        else:
            kept[str(name)] = _cut(_plain(change))
    return kept


def lines(changes: dict) -> list[str]:
    """One line per field, for people: `name: old → new`."""
    out = []
    for name, change in (changes or {}).items():
        if isinstance(change, list) and len(change) == 2:
            out.append(f"{name}: {_shown(change[0])} → {_shown(change[1])}")
        else:
            out.append(f"{name}: {change}")
    return out


def _shown(value) -> str:
    if value is None:
        return "—"
    return json.dumps(value, ensure_ascii=False) if not isinstance(value, str) else repr(value)
