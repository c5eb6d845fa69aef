"""`make run` as a new user runs it, and what PROTOCOL.md's "Interfaces that outside tools rely on" promises."""

import os
import re
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import psutil
import pytest
import requests

from llmsite.embedded import _free_port
from tests.conftest import process_gone

BASE_DIR = Path(__file__).resolve().parent.parent


def _env(data_dir: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "REDIS_URL", "DJANGO_SETTINGS_MODULE")}
    env.update({"LLMSITE_DATA_DIR": str(data_dir), "CI": "true", "PYTHONUNBUFFERED": "1"})
    return env


def _manage(env, *args, extra_env=None):
    return subprocess.run(
        [str(BASE_DIR / ".venv/bin/python"), "manage.py", *args],
        cwd=BASE_DIR,
        env={**env, **(extra_env or {})},
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    """`make run PORT=...` in the foreground of its own process group, with CI=true and no terminal."""
    data_dir = tmp_path_factory.mktemp("make-run")
    port = _free_port()
    env = _env(data_dir)
    log_path = data_dir / "make-run.log"
    log = open(log_path, "w")
    make = subprocess.Popen(
        ["make", "run", f"PORT={port}"], cwd=BASE_DIR, env=env, stdin=subprocess.DEVNULL, stdout=log,
        stderr=subprocess.STDOUT, start_new_session=True,
    )
    deadline = time.monotonic() + 600
    while "The site is up" not in log_path.read_text():
        assert make.poll() is None, log_path.read_text()[-3000:]
        assert time.monotonic() < deadline, log_path.read_text()[-3000:]
        time.sleep(0.5)
    yield {"make": make, "url": f"http://127.0.0.1:{port}", "env": env, "log": log_path, "data_dir": data_dir}
    if make.poll() is None:
        os.killpg(make.pid, signal.SIGKILL)


def test_make_run_prints_the_url_and_an_admin_login(site):
    output = site["log"].read_text()
    assert site["url"] in output
    assert re.search(r"Log in as user 'admin', password \S+", output)


def test_anonymous_visitor_is_sent_to_a_login_page_and_lands_on_chat(site):
    session = requests.Session()
    page = session.get(site["url"] + "/", timeout=30)
    assert "/accounts/login/" in page.url
    assert 'name="username"' in page.text and 'name="password"' in page.text
    password = re.search(r"password (\S+) \(kept in", site["log"].read_text()).group(1)
    csrf = session.cookies["csrftoken"]
    landed = session.post(
        page.url, data={"username": "admin", "password": password, "csrfmiddlewaretoken": csrf, "next": "/"},
        headers={"Referer": page.url}, timeout=30,
    )
    assert landed.status_code == 200 and "New chat" in landed.text


def test_manage_commands_from_another_terminal_reach_the_same_site(site):
    name = f"ops-{uuid.uuid4().hex[:6]}"
    created = _manage(
        site["env"], "createsuperuser", "--noinput",
        extra_env={"DJANGO_SUPERUSER_USERNAME": name, "DJANGO_SUPERUSER_PASSWORD": "pw-" + name, "DJANGO_SUPERUSER_EMAIL": f"{name}@example.com"},
    )
    assert created.returncode == 0, created.stderr
    made = _manage(site["env"], "create_token", name)
    assert made.returncode == 0, made.stderr
    token = made.stdout.split()[-1]
    answer = requests.post(f"{site['url']}/api/predict/default", headers={"Authorization": token}, data=b"Say hello.", timeout=120)
    assert answer.status_code == 200, answer.text
    assert answer.json()["response"]


def test_workers_are_child_processes_running_celery(site):
    children = psutil.Process(site["make"].pid).children(recursive=True)
    assert any("celery" in " ".join(p.cmdline()) for p in children)
    assert any("daphne" in " ".join(p.cmdline()) for p in children)


def test_sigint_to_the_process_group_stops_everything(site):
    group = [site["make"].pid] + [p.pid for p in psutil.Process(site["make"].pid).children(recursive=True)]
    os.killpg(site["make"].pid, signal.SIGINT)
    site["make"].wait(60)
    deadline = time.monotonic() + 30
    while not all(process_gone(pid) for pid in group):
        assert time.monotonic() < deadline, [psutil.Process(p).cmdline() for p in group if psutil.pid_exists(p)]
        time.sleep(0.5)
    # the embedded PostgreSQL (a daemon of its own) is stopped too
    assert not (site["data_dir"] / "postgres" / "postmaster.pid").exists()
    assert "stopped" in site["log"].read_text()


def test_pytest_finding_no_tests_fails_the_run(tmp_path):
    empty = tmp_path / "no_tests_here"
    empty.mkdir()
    result = subprocess.run(
        [sys.executable, "-m", "llmsite.launcher", "services", "--fresh", "--", str(BASE_DIR / ".venv/bin/pytest"), "-p", "no:django", str(empty)],
        cwd=BASE_DIR, env=_env(tmp_path / "data"), capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 1, result.stdout + result.stderr
    assert "no tests" in result.stdout
