"""The real stack for the suite: PostgreSQL+pgvector and Redis (started by `make test` through
`llmsite.launcher services`), one Celery worker process with the default model, and Daphne.

Tests talk to them as clients do (requests, websocket-client) and read the stored rows with the ORM.
"""

import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import psutil
import pytest
from django.conf import settings
from django.core.management import call_command

from llmsite.launcher import port_open, web_command, worker_command
from llmsite.embedded import _free_port

BASE_DIR = Path(__file__).resolve().parent.parent
# The stack's processes (started from here) cancel a generation nobody listens to after 1 s, not
# 10: the tests of a client leaving keep their meaning without waiting the default grace period.
os.environ.setdefault("RESUME_GRACE_SECONDS", "1")
# Their workers look for rows a dead worker left running, and sweep their waiting lines, every 2 s, not 15.
os.environ.setdefault("ORPHAN_SWEEP_SECONDS", "2")
READY_TIMEOUT = 600  # a first run de-quantizes the GGUF model once (about 30 s on 2 cores)

if settings.NOT_CONFIGURED:
    pytest.exit(
        "No database or Redis for the tests: run them with `make test` (it starts both).", returncode=2
    )


class Process:
    """A child process of the suite, with its output kept in a log file for failures."""

    def __init__(self, name: str, command: list[str], env: dict | None = None):
        self.name = name
        self.command = command
        self.env = {**os.environ, **(env or {})}
        self.log_path = Path(settings.DATA_DIR) / "logs" / f"{name}.log"
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self.popen: subprocess.Popen | None = None

    def start(self) -> "Process":
        log = open(self.log_path, "ab")
        self.popen = subprocess.Popen(self.command, cwd=BASE_DIR, env=self.env, stdout=log, stderr=subprocess.STDOUT)
        return self

    def alive(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def stop(self, timeout: float = 20) -> None:
        if not self.alive():
            return
        self.popen.terminate()
        try:
            self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            self.popen.kill()
            self.popen.wait()


def start_web(*, env: dict | None = None) -> tuple[Process, str]:
    port = _free_port()
    web = Process(f"daphne-{port}", web_command("127.0.0.1", port), env).start()
    deadline = time.monotonic() + 60
    while not port_open("127.0.0.1", port):
        if not web.alive() or time.monotonic() > deadline:
            raise RuntimeError(f"Daphne did not start:\n{web.log_tail()}")
        time.sleep(0.2)
    return web, f"http://127.0.0.1:{port}"


def wait_ready(deployment_name: str, worker: Process) -> None:
    from chat.models import Deployment

    deadline = time.monotonic() + READY_TIMEOUT
    while True:
        deployment = Deployment.objects.get(name=deployment_name)
        if deployment.status == Deployment.Status.READY:
            return
        if deployment.status == Deployment.Status.FAILED:
            raise RuntimeError(f"{deployment_name} failed to load: {deployment.status_detail}")
        if not worker.alive() or time.monotonic() > deadline:
            raise RuntimeError(f"the worker did not load {deployment_name}:\n{worker.log_tail()}")
        time.sleep(0.5)


def wait_for_log(process: Process, text: str, timeout: float = READY_TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while text not in process.log_path.read_text(errors="replace"):
        if not process.alive() or time.monotonic() > deadline:
            raise RuntimeError(f"{process.name} never logged {text!r}:\n{process.log_tail()}")
        time.sleep(0.2)


@pytest.fixture(scope="session")
def django_db_setup(django_db_blocker):
    """The suite's own database (a fresh data folder each `make test`), migrated once."""
    with django_db_blocker.unblock():
        call_command("migrate", interactive=False, verbosity=0)
        call_command("setup_site", "--no-admin", verbosity=0)


@pytest.fixture(autouse=True)
def _db_access(django_db_setup, django_db_blocker):
    # The worker and Daphne are other processes: tests commit for real so they see the rows.
    with django_db_blocker.unblock():
        yield


class Stack:
    def __init__(self, worker: Process, web: Process, url: str, worker_metrics_url: str = ""):
        self.worker, self.web, self.url = worker, web, url
        self.worker_metrics_url = worker_metrics_url  # the worker's own /metrics (WORKER_METRICS_PORT)

    @property
    def ws_url(self) -> str:
        return "ws" + self.url[len("http") :]

    def predict_url(self, deployment: str = "default") -> str:
        return f"{self.url}/api/predict/{deployment}"

    def predict_ws_url(self, deployment: str = "default") -> str:
        return f"{self.ws_url}/api/predict/{deployment}"


@pytest.fixture(scope="session")
def stack(django_db_setup, django_db_blocker):
    """A Celery worker serving the default deployment and Daphne in front, for the whole session."""
    from chat.models import Deployment

    with django_db_blocker.unblock():
        Deployment.objects.filter(name="default").update(status=Deployment.Status.UNKNOWN)
        metrics_port = _free_port()
        hostname = f"test-{uuid.uuid4().hex[:6]}@%h"
        worker_env = {"WORKER_METRICS_PORT": str(metrics_port)}
        worker = Process("worker", worker_command(["default", settings.EMBEDDING_QUEUE], hostname=hostname), worker_env).start()
        web, url = start_web()
        try:
            wait_ready("default", worker)
        except Exception:
            worker.stop()
            web.stop()
            raise
    yield Stack(worker, web, url, worker_metrics_url=f"http://127.0.0.1:{metrics_port}/metrics")
    web.stop()
    worker.stop()


@pytest.fixture
def user(db_user_factory):
    return db_user_factory()


@pytest.fixture
def db_user_factory():
    from django.contrib.auth import get_user_model

    def make(**extra):
        return get_user_model().objects.create_user(f"user-{uuid.uuid4().hex[:10]}", password="pw-" + uuid.uuid4().hex, **extra)

    return make


@pytest.fixture
def token(user):
    """A raw API token of a fresh user, valid for every deployment."""
    from chat.tokens import token_create

    return token_create(user=user)[1]


def process_gone(pid: int) -> bool:
    """Whether the process ended (a zombie has: it waits only for a parent that may never reap it)."""
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def pytest_report_header(config):
    return [f"llmsite data folder: {settings.DATA_DIR}", f"python: {sys.executable}"]
