"""The audit log in the admin: listed, filtered and searched; no one (a superuser included) adds,
changes or deletes an entry from the site."""

import uuid

from audit import services
from audit.models import AuditEntry
from tests.audit.conftest import address, client_from, person

Action = AuditEntry.Action
LIST = "/admin/audit/auditentry/"


def _entry() -> AuditEntry:
    return services.record(action=Action.LOGIN_FAILED, user=None, username=f"tried-{uuid.uuid4().hex[:8]}", address=address())


def _listed(response, entry: AuditEntry) -> bool:
    """Whether the entry is a row of the listing (not merely the search box's text)."""
    assert response.status_code == 200, response.status_code
    return f'class="field-username">{entry.username}<' in response.content.decode()


def test_entries_are_listed_filtered_and_searched(admin_user):
    entry = _entry()
    client = client_from(address(), admin_user)
    assert _listed(client.get(LIST, {"action__exact": "login_failed", "q": entry.username}), entry)
    assert not _listed(client.get(LIST, {"action__exact": "logout", "q": entry.username}), entry)
    assert _listed(client.get(LIST, {"q": entry.address}), entry)  # by address too
    assert not _listed(client.get(LIST, {"q": entry.username, "time__gte": "2999-01-01"}), entry)
    page = client.get(f"{LIST}{entry.pk}/change/")  # a read-only view of it
    assert page.status_code == 200 and entry.username in page.content.decode() and 'name="_save"' not in page.content.decode()


def test_the_admin_refuses_to_add_change_or_delete_an_entry(admin_user):
    entry = _entry()
    client = client_from(address(), admin_user)
    assert client.get(f"{LIST}add/").status_code == 403
    assert client.post(f"{LIST}add/", {"action": "login", "username": "forged"}).status_code == 403
    assert client.post(f"{LIST}{entry.pk}/change/", {"action": "login", "username": "forged", "_save": "Save"}).status_code == 403
    assert client.get(f"{LIST}{entry.pk}/delete/").status_code == 403
    assert client.post(f"{LIST}{entry.pk}/delete/", {"post": "yes"}).status_code == 403

    listing = client.get(LIST)
    assert 'value="delete_selected"' not in listing.content.decode()  # no delete action
    client.post(LIST, {"action": "delete_selected", "_selected_action": [entry.pk], "post": "yes"})
    kept = AuditEntry.objects.get(pk=entry.pk)
    assert (kept.action, kept.username, kept.address) == (entry.action, entry.username, entry.address)


def test_staff_without_the_view_permission_do_not_see_the_log():
    client = client_from(address(), person(is_staff=True))
    assert client.get(LIST).status_code == 403
