"""Logins, failed logins and logouts are recorded with the user and the address, on the site's
login page and on the admin's alike; a failed one names the username tried, never the password."""

import json
import uuid

from django.conf import settings

from audit.models import AuditEntry
from tests.audit.conftest import address, client_from, only_entry, person

Action = AuditEntry.Action


def test_site_login_failed_login_and_logout_are_recorded_with_user_and_address():
    password = "pw-" + uuid.uuid4().hex
    user = person(password=password)
    ip = address()
    client = client_from(ip)

    wrong = "wrong-" + uuid.uuid4().hex
    assert client.post("/accounts/login/", {"username": user.username, "password": wrong}).status_code == 200
    failed = only_entry(action=Action.LOGIN_FAILED, username=user.username)
    assert failed.user is None and failed.address == ip and failed.note == "/accounts/login/"
    assert wrong not in json.dumps([failed.changes, failed.note, failed.object_text])

    assert client.post("/accounts/login/", {"username": user.username, "password": password}).status_code == 302
    login = only_entry(action=Action.LOGIN, user=user)
    assert (login.username, login.address, login.note) == (user.username, ip, "/accounts/login/")

    assert client.post("/accounts/logout/").status_code == 302
    logout = only_entry(action=Action.LOGOUT, user=user)
    assert (logout.username, logout.address) == (user.username, ip)
    assert login.time <= logout.time


def test_admin_login_and_failed_admin_login_are_recorded():
    password = "pw-" + uuid.uuid4().hex
    staff = person(password=password, is_staff=True)
    ip = address()
    client = client_from(ip)

    assert client.post("/admin/login/", {"username": staff.username, "password": "nope"}).status_code == 200
    failed = only_entry(action=Action.LOGIN_FAILED, username=staff.username)
    assert (failed.address, failed.note) == (ip, "/admin/login/")

    response = client.post("/admin/login/?next=/admin/", {"username": staff.username, "password": password, "next": "/admin/"})
    assert response.status_code == 302
    login = only_entry(action=Action.LOGIN, user=staff)
    assert (login.address, login.note) == (ip, "/admin/login/")


def test_a_failed_login_for_a_name_nobody_has_is_recorded_with_that_name():
    ip = address()
    tried = f"nobody-{uuid.uuid4().hex[:8]}"
    client_from(ip).post("/accounts/login/", {"username": tried, "password": "guess"})
    failed = only_entry(action=Action.LOGIN_FAILED, username=tried)
    assert failed.user is None and failed.address == ip


def test_a_locked_out_attempt_is_recorded_as_such():
    password = "pw-" + uuid.uuid4().hex
    user = person(password=password)
    client = client_from(address())
    for attempt in range(settings.AXES_FAILURE_LIMIT):
        client.post("/accounts/login/", {"username": user.username, "password": f"wrong-{attempt}"})
    assert client.post("/accounts/login/", {"username": user.username, "password": password}).status_code == 429
    failed = AuditEntry.objects.filter(action=Action.LOGIN_FAILED, username=user.username).order_by("time", "pk")
    assert failed.count() == settings.AXES_FAILURE_LIMIT + 1  # the right password, refused, too
    assert failed.last().note == "/accounts/login/ (locked out)"
    assert not AuditEntry.objects.filter(action=Action.LOGIN, user=user).exists()
