"""API tokens: made in the admin or by `manage.py create_token`, revoked by the admin's action or
on its form; each is an entry with who, from where and which token, and never the token itself."""

import json

from django.core.management import call_command

from audit.models import AuditEntry
from chat.models import ApiToken, Deployment
from tests.audit.conftest import address, client_from, form_data, only_entry, person

Action = AuditEntry.Action


def _text(entry: AuditEntry) -> str:
    return json.dumps([entry.changes, entry.note, entry.object_text, entry.username])


def test_a_token_made_in_the_admin_is_recorded_with_the_admin_and_the_address(admin_user):
    owner, ip = person(), address()
    client = client_from(ip, admin_user)
    default = Deployment.objects.get(name="default")
    response = client.post(
        "/admin/chat/apitoken/add/",
        {"user": owner.pk, "name": "laptop", "deployments": [default.pk], "requests_per_minute": "30",
         "tokens_per_minute": "", "revoked_at_0": "", "revoked_at_1": ""},
    )  # fmt: skip
    assert response.status_code == 302, response.content.decode()[:3000]
    token = ApiToken.objects.get(user=owner)
    entry = only_entry(action=Action.TOKEN_CREATED, object_id=str(token.pk), object_type="chat.apitoken")
    assert (entry.user, entry.address) == (admin_user, ip)
    assert entry.changes == {
        "user": [None, owner.username], "name": [None, "laptop"], "deployments": [None, ["default"]], "requests_per_minute": [None, 30],
    }  # fmt: skip
    assert token.digest not in _text(entry)
    assert not AuditEntry.objects.filter(action=Action.ADMIN_ADDED, object_id=str(token.pk), object_type="chat.apitoken").exists()


def test_revoking_in_the_admin_by_action_or_on_the_form_is_recorded(admin_user):
    from chat.tokens import token_create

    owner, ip = person(), address()
    client = client_from(ip, admin_user)
    by_action, _ = token_create(user=owner, name="one")
    on_form, _ = token_create(user=owner, name="two")

    client.post("/admin/chat/apitoken/", {"action": "revoke", "_selected_action": [by_action.pk]})
    entry = only_entry(action=Action.TOKEN_REVOKED, object_id=str(by_action.pk), object_type="chat.apitoken")
    assert (entry.user, entry.address) == (admin_user, ip)
    assert entry.changes["revoked_at"][0] is None and entry.changes["revoked_at"][1]

    url = f"/admin/chat/apitoken/{on_form.pk}/change/"
    data = form_data(client, url, "apitoken_form")
    data.update({"revoked_at_0": ["2026-01-02"], "revoked_at_1": ["03:04:05"], "_save": ["Save"]})
    assert client.post(url, data).status_code == 302
    entry = only_entry(action=Action.TOKEN_REVOKED, object_id=str(on_form.pk), object_type="chat.apitoken")
    assert (entry.user, entry.address) == (admin_user, ip)
    assert entry.changes == {"revoked_at": [None, "2026-01-02 03:04:05+00:00"]}

    client.post("/admin/chat/apitoken/", {"action": "revoke", "_selected_action": [by_action.pk]})  # already revoked
    assert AuditEntry.objects.filter(action=Action.TOKEN_REVOKED, object_id=str(by_action.pk), object_type="chat.apitoken").count() == 1


def test_a_token_made_by_the_command_names_its_user_and_no_address(capsys):
    owner = person()
    call_command("create_token", owner.username, "--name", "cli")
    raw = capsys.readouterr().out.split()[-1]
    token = ApiToken.objects.get(user=owner)
    entry = only_entry(action=Action.TOKEN_CREATED, object_id=str(token.pk), object_type="chat.apitoken")
    assert (entry.user, entry.username, entry.address, entry.note) == (owner, owner.username, None, "command")
    assert raw not in _text(entry) and token.digest not in _text(entry)
