"""Case 15: production settings (DJANGO_HTTPS) refuse to start without DJANGO_SECRET_KEY; with one,
`manage.py check --deploy` passes (tests/test_security_settings.py) and the cookies are secure."""

import os
import secrets
import subprocess
import sys
from pathlib import Path

BASE_DIR = Path(__file__).resolve().parent.parent.parent


def manage(*args, **env_changes):
    env = {**os.environ, "DJANGO_HTTPS": "true", "DJANGO_DEBUG": "false", **env_changes}
    env = {k: v for k, v in env.items() if v is not None}
    return subprocess.run([sys.executable, "manage.py", *args], cwd=BASE_DIR, env=env, capture_output=True, text=True, timeout=120)


def test_production_without_a_secret_key_refuses_to_start_naming_it():
    result = manage("check", "--deploy", DJANGO_SECRET_KEY=None)
    assert result.returncode != 0
    assert "DJANGO_SECRET_KEY" in result.stderr


def test_production_settings_make_cookies_secure_and_send_hsts():
    code = (
        "from django.conf import settings as s;"
        "print(s.SESSION_COOKIE_SECURE, s.CSRF_COOKIE_SECURE, s.SECURE_SSL_REDIRECT, s.SECURE_HSTS_SECONDS, s.DEBUG)"
    )
    result = manage("shell", "-c", code, DJANGO_SECRET_KEY=secrets.token_urlsafe(60), DJANGO_HSTS_SECONDS="600")
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[-1].split() == ["True", "True", "True", "600", "False"]
