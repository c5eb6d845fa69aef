"""Production settings pass Django's deployment checks; API tokens are stored only as digests."""

import os
import secrets
import subprocess
import sys
from pathlib import Path

from chat.models import ApiToken
from chat.tokens import token_create

BASE_DIR = Path(__file__).resolve().parent.parent


def test_manage_check_deploy_passes_with_production_settings():
    env = {**os.environ, "DJANGO_HTTPS": "true", "DJANGO_SECRET_KEY": secrets.token_urlsafe(60), "DJANGO_DEBUG": "false"}
    result = subprocess.run(
        [sys.executable, "manage.py", "check", "--deploy", "--fail-level", "WARNING"],
        cwd=BASE_DIR, env=env, capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_tokens_are_stored_as_digests_with_only_a_prefix_shown(user):
    token, raw = token_create(user=user)
    row = ApiToken.objects.filter(pk=token.pk).values().get()
    assert raw not in {str(v) for v in row.values()}
    assert row["prefix"] == raw[:10] and len(row["digest"]) == 64
