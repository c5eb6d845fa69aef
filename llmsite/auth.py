"""API tokens at the edge: the `Authorization` header read, checked and kept fresh, for every
token API (predict, /v1, knowledge bases)."""

import datetime

from django.utils import timezone

from llmsite.errors import Unauthorized

LAST_USED_RESOLUTION = datetime.timedelta(minutes=1)  # how stale a token's last_used_at may be


def token_from_header(value: str | None) -> str | None:
    """`Authorization: <token>` and `Authorization: Bearer <token>` are both accepted."""
    if not value:
        return None
    value = value.strip()
    scheme, _, rest = value.partition(" ")
    if scheme.lower() == "bearer" and rest.strip():
        return rest.strip()
    return value or None


def authenticate(*, header: str | None):
    """The active ApiToken named by the header, else Unauthorized (401)."""
    from chat.models import ApiToken, hash_token

    raw = token_from_header(header)
    if not raw:
        raise Unauthorized("Missing API token: send it in the Authorization header.")
    token = ApiToken.objects.select_related("user").filter(digest=hash_token(raw)).first()
    if token is None or not token.is_active or not token.user.is_active:
        raise Unauthorized("Invalid or revoked API token.")
    now = timezone.now()
    if token.last_used_at is None or now - token.last_used_at >= LAST_USED_RESOLUTION:
        ApiToken.objects.filter(pk=token.pk).update(last_used_at=now)  # a write (and commit) a minute, not a request
    return token


def check_token_active(*, token) -> None:
    """A token checked once at a WebSocket's handshake may be revoked while the socket is open:
    each later message checks again, so a revocation takes effect at once."""
    if not type(token).objects.filter(pk=token.pk, revoked_at__isnull=True, user__is_active=True).exists():
        raise Unauthorized("Invalid or revoked API token.")
