"""Case 16 (logins): after LOGIN_FAILURE_LIMIT wrong passwords for one username from one address,
that pair is refused with 429, even with the right password, while other users still log in."""

from django.conf import settings

from tests.security.conftest import login


def test_login_is_locked_after_repeated_failures_and_others_are_unaffected(stack, site_user, db_user_factory):
    user, password = site_user
    limit = settings.AXES_FAILURE_LIMIT
    for attempt in range(limit - 1):
        response = login(stack.url, user.username, f"wrong-{attempt}")
        assert response.status_code == 200 and "username and password didn" in response.text
    locked = login(stack.url, user.username, "wrong-last")
    assert locked.status_code == 429, locked.status_code
    assert "locked" in locked.text.lower()

    assert login(stack.url, user.username, password).status_code == 429  # the right password too
    assert login(stack.url, user.username, password, path="/admin/login/").status_code == 429  # and the admin's login

    other = db_user_factory()
    other.set_password("pw-other-ok")
    other.save()
    assert login(stack.url, other.username, "pw-other-ok").status_code == 302


def test_a_successful_login_resets_the_count(stack, site_user):
    user, password = site_user
    for _ in range(2):
        for attempt in range(settings.AXES_FAILURE_LIMIT - 1):
            assert login(stack.url, user.username, f"wrong-{attempt}").status_code == 200
        assert login(stack.url, user.username, password).status_code == 302
