"""API tokens: created here, shown once, stored only as a digest; revoked here. Both are audited
(`request`: who did it and from where; without one, the token's user and no address)."""

from django.db import transaction
from django.utils import timezone

from audit import services as audit
from chat.models import ApiToken, Deployment


@transaction.atomic
def token_create(
    *,
    user,
    name: str = "",
    deployments: list[Deployment] | None = None,
    requests_per_minute: int | None = None,
    tokens_per_minute: int | None = None,
    request=None,
    note: str = "",
) -> tuple[ApiToken, str]:
    """Create a token for `user`; returns the row and the raw token (never stored)."""
    raw = ApiToken.new_raw_token()
    token = ApiToken(user=user, name=name, requests_per_minute=requests_per_minute, tokens_per_minute=tokens_per_minute)
    token.set_raw(raw)
    token.save()
    if deployments:
        token.deployments.set(deployments)
    described = {
        "user": user.get_username(),
        "name": name,
        "deployments": sorted(d.name for d in deployments or []),
        "requests_per_minute": requests_per_minute,
        "tokens_per_minute": tokens_per_minute,
    }
    changes = {field: [None, value] for field, value in described.items() if value not in (None, "", [])}
    actor = {} if request is not None else {"user": user}
    audit.record(action=audit.Action.TOKEN_CREATED, request=request, obj=token, changes=changes, note=note, **actor)
    return token, raw


@transaction.atomic
def token_revoke(*, tokens, request=None, note: str = "") -> int:
    """Revoke those of `tokens` (a queryset) not revoked yet; returns how many were."""
    now = timezone.now()
    revoked = list(ApiToken.objects.select_for_update(of=("self",)).select_related("user").filter(pk__in=tokens.values("pk"), revoked_at__isnull=True))
    ApiToken.objects.filter(pk__in=[t.pk for t in revoked]).update(revoked_at=now)
    for token in revoked:
        actor = {} if request is not None else {"user": token.user}
        audit.record(
            action=audit.Action.TOKEN_REVOKED, request=request, obj=token, changes={"revoked_at": [None, now]}, note=note, **actor
        )
    return len(revoked)
