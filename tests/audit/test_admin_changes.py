"""Changes in the admin (deployments, knowledge bases, users and their passwords, groups) are
recorded with the admin, the address, the object and what changed: {field: [old, new]}, secrets
as "changed"; a deletion keeps what the object held, and the entries of a deleted user its name."""

import json
import uuid

from django.contrib.auth.models import Group, Permission

from audit.models import AuditEntry
from chat.models import Deployment
from knowledge.models import KnowledgeBase
from tests.audit.conftest import address, client_from, form_data, only_entry, person

Action = AuditEntry.Action


def _save(client, url: str, form_id: str, **changes) -> None:
    data = form_data(client, url, form_id)
    for name, value in changes.items():
        if value is None:
            data.pop(name, None)
        else:
            data[name] = value if isinstance(value, list) else [value]
    response = client.post(url, {**data, "_save": "Save"})
    assert response.status_code == 302, response.content.decode()[:3000]


def test_a_deployment_changed_and_deleted_in_the_admin_is_recorded_with_what_changed(admin_user):
    ip = address()
    client = client_from(ip, admin_user)
    deployment = Deployment.objects.create(name=f"audit-{uuid.uuid4().hex[:8]}", model_source="pkg:none/model.gguf")

    _save(client, f"/admin/chat/deployment/{deployment.pk}/change/", "deployment_form", default_temperature="0.5", enabled=None)
    entry = only_entry(action=Action.ADMIN_CHANGED, object_type="chat.deployment", object_id=str(deployment.pk))
    assert (entry.user, entry.username, entry.address, entry.object_text) == (admin_user, admin_user.username, ip, deployment.name)
    assert entry.changes == {"enabled": [True, False], "default_temperature": [0.95, 0.5]}
    shown = client.get(f"/admin/audit/auditentry/{entry.pk}/change/").content.decode()
    assert "default_temperature: 0.95 → 0.5" in shown and "enabled: true → false" in shown

    _save(client, f"/admin/chat/deployment/{deployment.pk}/change/", "deployment_form")  # nothing changed: no entry
    assert AuditEntry.objects.filter(object_type="chat.deployment", object_id=str(deployment.pk)).count() == 1

    response = client.post(f"/admin/chat/deployment/{deployment.pk}/delete/", {"post": "yes"})
    assert response.status_code == 302 and not Deployment.objects.filter(pk=deployment.pk).exists()
    deleted = only_entry(action=Action.ADMIN_DELETED, object_type="chat.deployment", object_id=str(deployment.pk))
    assert (deleted.user, deleted.address, deleted.object_text) == (admin_user, ip, deployment.name)
    assert deleted.changes["model_source"] == ["pkg:none/model.gguf", None]


def test_a_knowledge_base_changed_in_the_admin_records_fields_and_sharing(admin_user):
    ip, owner, reader = address(), person(), person()
    client = client_from(ip, admin_user)
    kb = KnowledgeBase.objects.create(name=f"kb-{uuid.uuid4().hex[:10]}", owner=owner)

    _save(client, f"/admin/knowledge/knowledgebase/{kb.pk}/change/", "knowledgebase_form", retrieval_k="6", shared_with=[str(reader.pk)])
    entry = only_entry(action=Action.ADMIN_CHANGED, object_type="knowledge.knowledgebase", object_id=str(kb.pk))
    assert (entry.user, entry.address) == (admin_user, ip)
    assert entry.changes == {"retrieval_k": [4, 6], "shared_with": [[], [reader.username]]}


def test_users_and_groups_changed_in_the_admin_are_recorded_and_passwords_show_as_changed(admin_user):
    ip = address()
    client = client_from(ip, admin_user)
    user = person(password="pw-old-" + uuid.uuid4().hex)

    _save(client, f"/admin/auth/user/{user.pk}/change/", "user_form", first_name="Ada", is_staff="on")
    entry = only_entry(action=Action.ADMIN_CHANGED, object_type="auth.user", object_id=str(user.pk))
    assert (entry.user, entry.address, entry.object_text) == (admin_user, ip, user.username)
    assert entry.changes == {"first_name": ["", "Ada"], "is_staff": [False, True]}

    new_password = "pw-new-" + uuid.uuid4().hex
    response = client.post(
        f"/admin/auth/user/{user.pk}/password/", {"password1": new_password, "password2": new_password, "usable_password": "true"}
    )
    assert response.status_code == 302
    user.refresh_from_db()
    assert user.check_password(new_password)
    changed = AuditEntry.objects.filter(action=Action.ADMIN_CHANGED, object_type="auth.user", object_id=str(user.pk)).latest("time", "pk")
    assert changed.changes == {"password": "changed"} and changed.address == ip
    stored = json.dumps(list(AuditEntry.objects.filter(object_id=str(user.pk), object_type="auth.user").values()), default=str)
    assert user.password not in stored and new_password not in stored

    permission = Permission.objects.get(codename="view_auditentry")
    name = f"auditors-{uuid.uuid4().hex[:8]}"
    response = client.post("/admin/auth/group/add/", {"name": name, "permissions": [permission.pk], "_save": "Save"})
    assert response.status_code == 302, response.content.decode()[:3000]
    group = Group.objects.get(name=name)
    added = only_entry(action=Action.ADMIN_ADDED, object_type="auth.group", object_id=str(group.pk))
    assert (added.user, added.address) == (admin_user, ip)
    assert added.changes == {"name": [None, name], "permissions": [None, [str(permission)]]}


def test_a_user_deleted_in_the_admin_keeps_their_name_in_the_log(admin_user):
    ip = address()
    password = "pw-" + uuid.uuid4().hex
    user = person(password=password)
    client_from(ip).post("/accounts/login/", {"username": user.username, "password": password})
    user_pk, username = user.pk, user.username

    response = client_from(ip, admin_user).post(f"/admin/auth/user/{user_pk}/delete/", {"post": "yes"})
    assert response.status_code == 302
    login = only_entry(action=Action.LOGIN, username=username)
    assert login.user is None and login.address == ip  # the user is gone, the name stays
    deleted = only_entry(action=Action.ADMIN_DELETED, object_type="auth.user", object_id=str(user_pk))
    assert deleted.object_text == username and deleted.changes["username"] == [username, None]
    assert "password" not in deleted.changes
