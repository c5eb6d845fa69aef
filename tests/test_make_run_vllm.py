"""`make run ENGINE=vllm` as a new user runs it on a CPU machine: the default model answers through
vLLM's CPU build in a worker of .venv-vllm, and `make run` says which engine the default
deployment runs and why, now and on the next plain `make run` (the choice stays stored)."""

import os
import signal
import subprocess
import time

import psutil
import pytest
import requests

from llmsite.embedded import _free_port
from tests.test_one_command_start import BASE_DIR, _env, _manage
from tests.workers.test_vllm_real import VLLM_PYTHON, _vllm_installable

pytestmark = pytest.mark.skipif(
    not _vllm_installable(), reason="vLLM's CPU build needs an x86-64 CPU with AVX2: vLLM cannot be installed here"
)


def _make_run(env: dict, log_path, *options: str) -> subprocess.Popen:
    log = open(log_path, "w")
    return subprocess.Popen(
        ["make", "run", *options], cwd=BASE_DIR, env=env, stdin=subprocess.DEVNULL, stdout=log,
        stderr=subprocess.STDOUT, start_new_session=True,
    )


def _wait_for(make: subprocess.Popen, log_path, text: str, timeout: float = 900) -> str:
    deadline = time.monotonic() + timeout  # bounds the wait; no speed is asserted
    while text not in (output := log_path.read_text()):
        assert make.poll() is None, output[-3000:]
        assert time.monotonic() < deadline, output[-3000:]
        time.sleep(0.5)
    return output


def _stop(make: subprocess.Popen) -> None:
    os.killpg(make.pid, signal.SIGINT)
    try:
        make.wait(120)
    except subprocess.TimeoutExpired:
        os.killpg(make.pid, signal.SIGKILL)
        make.wait(30)


def test_make_run_engine_vllm_answers_through_vllm_and_the_choice_is_stored(tmp_path):
    assert VLLM_PYTHON.exists(), f"no vLLM environment at {VLLM_PYTHON}: `make test` builds it (`make vllm-venv`)"
    env = {**_env(tmp_path / "data"), "LLMSITE_VLLM_ENFORCE_EAGER": "1"}  # no compilation: a start in seconds
    port = _free_port()
    make = _make_run(env, tmp_path / "first.log", f"PORT={port}", "ENGINE=vllm")
    try:
        output = _wait_for(make, tmp_path / "first.log", "The site is up")
        assert "Deployment 'default' runs the vllm engine: given now" in output
        line = next((line for line in output.splitlines() if "the vllm deployments' queues (default) get a worker of" in line), output[-3000:])
        assert ".venv-vllm/bin/python" in line, line
        titles = [" ".join(p.cmdline()) for p in psutil.Process(make.pid).children(recursive=True)]
        assert any("--hostname vllm@" in title for title in titles), titles  # that worker runs
        created = _manage(env, "createsuperuser", "--noinput", extra_env={
            "DJANGO_SUPERUSER_USERNAME": "ops", "DJANGO_SUPERUSER_PASSWORD": "pw-ops-123", "DJANGO_SUPERUSER_EMAIL": "ops@example.com"})
        assert created.returncode == 0, created.stderr
        token = _manage(env, "create_token", "ops").stdout.split()[-1]
        answer = requests.post(f"http://127.0.0.1:{port}/api/predict/default", headers={"Authorization": token},
                               json={"prompt": "What is the capital of Egypt?", "temperature": 0, "max_new_tokens": 16}, timeout=300)
        assert answer.status_code == 200, answer.text
        assert "Cairo" in answer.json()["response"]
    finally:
        _stop(make)

    make = _make_run(env, tmp_path / "second.log", f"PORT={_free_port()}")  # a later plain `make run`
    try:
        output = _wait_for(make, tmp_path / "second.log", "runs the ")
        line = next(line for line in output.splitlines() if "Deployment 'default' runs the" in line)
        assert "runs the vllm engine: stored with the deployment" in line and "make run ENGINE=" in line, line
    finally:
        _stop(make)
