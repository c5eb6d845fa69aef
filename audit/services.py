"""The audit log's one way in: `record(...)` an action (at the edge, where the request is), and
forget entries older than AUDIT_LOG_DAYS. Imports nothing from chat/, knowledge/ or workers/."""

import ipaddress
import logging
import threading
import time
from dataclasses import dataclass
from datetime import timedelta
from functools import lru_cache

from django.conf import settings
from django.utils import timezone

from audit.changes import stored
from audit.models import AuditEntry

log = logging.getLogger(__name__)

Action = AuditEntry.Action
PURGE_EVERY_SECONDS = 3600  # `record` forgets old entries at most this often per process
FROM_REQUEST = object()  # `record`'s default user: the request's logged-in user
_purge_lock = threading.Lock()
_last_purge: float | None = None


@dataclass(frozen=True)
class Target:
    """What an action touched, taken before it goes (a deleted row has no pk left)."""

    type: str = ""
    id: str = ""
    text: str = ""


def describe(obj) -> Target:
    if obj is None:
        return Target()
    if isinstance(obj, Target):
        return obj
    return Target(type=obj._meta.label_lower, id="" if obj.pk is None else str(obj.pk), text=str(obj)[:200])


# --- the client's address ---------------------------------------------------------------------


def _ip(value):
    try:
        return ipaddress.ip_address((value or "").strip())
    except ValueError:
        return None


@lru_cache(maxsize=8)
def _networks(cidrs: tuple[str, ...]):
    return tuple(ipaddress.ip_network(cidr.strip(), strict=False) for cidr in cidrs if cidr.strip())


def _trusted(ip, proxies) -> bool:
    return any(ip.version == net.version and ip in net for net in proxies)


def client_address(request) -> str | None:
    """The client's IP address: REMOTE_ADDR; where that is a proxy named in TRUSTED_PROXIES, the
    last address in X-Forwarded-For that is not one (what the trusted proxies appended; what the
    client sent itself is its own to forge). django-axes uses it too (AXES_CLIENT_IP_CALLABLE)."""
    if request is None:
        return None
    address = _ip(request.META.get("REMOTE_ADDR"))
    proxies = _networks(tuple(settings.TRUSTED_PROXIES))
    if address is None or not proxies or not _trusted(address, proxies):
        return None if address is None else str(address)
    forwarded = [hop for hop in request.META.get("HTTP_X_FORWARDED_FOR", "").split(",") if hop.strip()]
    for hop in reversed(forwarded):
        ip = _ip(hop)
        if ip is None:
            break  # garbage: keep the last address a trusted proxy vouched for
        address = ip
        if not _trusted(ip, proxies):
            break
    return str(address)


# --- recording --------------------------------------------------------------------------------


def _request_user(request):
    user = getattr(request, "user", None)
    return user if user is not None and user.is_authenticated else None


def record(
    *,
    action: str,
    request=None,
    user=FROM_REQUEST,
    username: str | None = None,
    address: str | None = None,
    obj=None,
    changes: dict | None = None,
    note: str = "",
) -> AuditEntry:
    """Store one entry. `user` defaults to the request's logged-in user (None: no one) and
    `address` to the request's client; `obj` (a model instance or a Target) names what was touched;
    `changes` is {field: [old, new]} (see audit.changes: secrets are never in it)."""
    user = _request_user(request) if user is FROM_REQUEST else user
    if username is None:
        username = user.get_username() if user is not None else ""
    target = describe(obj)
    entry = AuditEntry.objects.create(
        action=action,
        user=user,
        username=str(username)[:150],
        address=address if address is not None else client_address(request),
        object_type=target.type,
        object_id=target.id[:64],
        object_text=target.text,
        changes=stored(changes or {}),
        note=note[:200],
    )
    _purge_now_and_then()
    return entry


# --- retention --------------------------------------------------------------------------------


def purge(*, days: int | None = None) -> int:
    """Delete entries older than `days` (default AUDIT_LOG_DAYS; 0 or less keeps them all)."""
    days = settings.AUDIT_LOG_DAYS if days is None else days
    if days <= 0:
        return 0
    deleted, _ = AuditEntry.objects.filter(time__lt=timezone.now() - timedelta(days=days)).delete()
    return deleted


def _purge_now_and_then() -> None:
    """No periodic machinery: the first entry a process records, and then one an hour, purges."""
    global _last_purge
    now = time.monotonic()
    with _purge_lock:
        if _last_purge is not None and now - _last_purge < PURGE_EVERY_SECONDS:
            return
        _last_purge = now
    deleted = purge()
    if deleted:
        log.info("audit log: forgot %d entries older than %d days", deleted, settings.AUDIT_LOG_DAYS)
