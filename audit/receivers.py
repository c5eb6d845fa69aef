"""Logins, failed logins and logouts, from django.contrib.auth's signals: the site's login page
and the admin's both send them (django-axes listens to the same signals for its throttle)."""

from django.contrib.auth import get_user_model
from django.contrib.auth.signals import user_logged_in, user_logged_out, user_login_failed

from audit.services import Action, record


def _path(request) -> str:
    return getattr(request, "path", "") or ""


def logged_in(sender, request, user, **kwargs):
    record(action=Action.LOGIN, request=request, user=user, note=_path(request))


def login_failed(sender, credentials, request=None, **kwargs):
    """The username tried (never the password: Django passes it masked) and where from."""
    field = get_user_model().USERNAME_FIELD
    username = credentials.get(field) or credentials.get("username") or ""
    locked = " (locked out)" if getattr(request, "axes_locked_out", False) else ""
    record(action=Action.LOGIN_FAILED, request=request, user=None, username=str(username), note=_path(request) + locked)


def logged_out(sender, request, user, **kwargs):
    if user is not None:  # a logout without a login changes nothing
        record(action=Action.LOGOUT, request=request, user=user, note=_path(request))


def connect() -> None:
    user_logged_in.connect(logged_in, dispatch_uid="audit.logged_in")
    user_login_failed.connect(login_failed, dispatch_uid="audit.login_failed")
    user_logged_out.connect(logged_out, dispatch_uid="audit.logged_out")
