"""API tokens: created here, shown once, stored only as a digest."""

from django.db import transaction

from chat.models import ApiToken, Deployment


@transaction.atomic
def token_create(*, user, name: str = "", deployments: list[Deployment] | None = None) -> tuple[ApiToken, str]:
    """Create a token for `user`; returns the row and the raw token (never stored)."""
    raw = ApiToken.new_raw_token()
    token = ApiToken(user=user, name=name)
    token.set_raw(raw)
    token.save()
    if deployments:
        token.deployments.set(deployments)
    return token, raw
