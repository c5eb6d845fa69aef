"""Helpers of the audit-log tests: clients that come from a known address, the admin's forms
filled in as a browser would send them, and the entries an action left."""

import uuid
from html.parser import HTMLParser

import pytest
from django.contrib.auth import get_user_model
from django.test import Client

from audit.models import AuditEntry


def address() -> str:
    """A fresh documentation address (TEST-NET-3), so each test finds its own entries."""
    return f"203.0.113.{uuid.uuid4().int % 250 + 1}"


def client_from(ip: str, user=None, **extra) -> Client:
    client = Client(REMOTE_ADDR=ip, **extra)
    if user is not None:
        client.force_login(user)
    return client


def person(password: str | None = None, **extra):
    """A fresh user; with `password`, one that can log in with it."""
    return get_user_model().objects.create_user(f"audit-{uuid.uuid4().hex[:10]}", password=password, **extra)


@pytest.fixture
def admin_user():
    return person(password="pw-" + uuid.uuid4().hex, is_staff=True, is_superuser=True)


def entries(**filters) -> list[AuditEntry]:
    return list(AuditEntry.objects.filter(**filters).order_by("time", "pk"))


def only_entry(**filters) -> AuditEntry:
    found = entries(**filters)
    assert len(found) == 1, [(e.action, e.username, e.object_text, e.note) for e in found] or f"no entry for {filters}"
    return found[0]


class _FormReader(HTMLParser):
    """The fields one form of a page would submit: checked boxes, selected options, textareas."""

    def __init__(self, form_id: str):
        super().__init__(convert_charrefs=True)
        self.form_id, self.inside, self.select, self.textarea = form_id, False, None, None
        self.data: dict[str, list[str]] = {}

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "form":
            self.inside = a.get("id") == self.form_id
        if not self.inside or "disabled" in a:
            return
        name = a.get("name")
        if tag == "input" and name:
            kind = a.get("type", "text")
            if kind in ("submit", "button", "file", "image", "reset"):
                return
            if kind in ("checkbox", "radio") and "checked" not in a:
                return
            self.data.setdefault(name, []).append(a.get("value", "on" if kind == "checkbox" else "") or "")
        elif tag == "select":
            self.select = name
        elif tag == "option" and self.select and "selected" in a:
            self.data.setdefault(self.select, []).append(a.get("value", ""))
        elif tag == "textarea" and name:
            self.textarea = name
            self.data[name] = [""]

    def handle_data(self, data):
        if self.inside and self.textarea:
            self.data[self.textarea][-1] += data

    def handle_endtag(self, tag):
        if tag == "form":
            self.inside = False
        elif tag == "select":
            self.select = None
        elif tag == "textarea" and self.textarea:
            value = self.data[self.textarea][-1]
            self.data[self.textarea][-1] = value[1:] if value.startswith("\n") else value  # as browsers do
            self.textarea = None


def form_data(client: Client, url: str, form_id: str) -> dict[str, list[str]]:
    """The admin form at `url` as the browser would post it unchanged."""
    page = client.get(url)
    assert page.status_code == 200, page.status_code
    reader = _FormReader(form_id)
    reader.feed(page.content.decode())
    assert reader.data, f"no form {form_id} at {url}"
    return reader.data
