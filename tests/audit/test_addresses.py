"""The client's address: REMOTE_ADDR; X-Forwarded-For only behind a proxy named in TRUSTED_PROXIES,
and then the last address in it that is not a trusted proxy (what the client wrote is its own)."""

import uuid

from django.test import RequestFactory

from audit.models import AuditEntry
from audit.services import client_address
from tests.audit.conftest import client_from, only_entry, person


def _request(remote: str, forwarded: str | None = None):
    extra = {"REMOTE_ADDR": remote}
    if forwarded is not None:
        extra["HTTP_X_FORWARDED_FOR"] = forwarded
    return RequestFactory().get("/", **extra)


def test_forwarded_for_is_ignored_unless_the_proxy_is_trusted(settings):
    settings.TRUSTED_PROXIES = []
    assert client_address(_request("198.51.100.7", "203.0.113.1")) == "198.51.100.7"
    settings.TRUSTED_PROXIES = ["10.0.0.0/8"]
    assert client_address(_request("198.51.100.7", "203.0.113.1")) == "198.51.100.7"  # not from the proxy
    assert client_address(_request("10.0.0.2")) == "10.0.0.2"


def test_behind_trusted_proxies_the_last_untrusted_hop_is_the_client(settings):
    settings.TRUSTED_PROXIES = ["10.0.0.0/8", "fd00::/8"]
    assert client_address(_request("10.0.0.2", "203.0.113.1")) == "203.0.113.1"
    # the client forged the first entry; the proxies appended the rest
    assert client_address(_request("10.0.0.2", "192.0.2.99, 203.0.113.1, 10.1.1.1")) == "203.0.113.1"
    assert client_address(_request("10.0.0.2", "2001:db8::5")) == "2001:db8::5"
    assert client_address(_request("10.0.0.2", "not-an-address")) == "10.0.0.2"
    assert client_address(_request("garbage")) is None


def test_a_login_behind_a_trusted_proxy_records_the_forwarded_address(settings):
    settings.TRUSTED_PROXIES = ["10.0.0.0/8"]
    password = "pw-" + uuid.uuid4().hex
    user = person(password=password)
    client = client_from("10.0.0.2", HTTP_X_FORWARDED_FOR="203.0.113.77")
    assert client.post("/accounts/login/", {"username": user.username, "password": password}).status_code == 302
    assert only_entry(action=AuditEntry.Action.LOGIN, user=user).address == "203.0.113.77"
