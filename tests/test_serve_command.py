"""`python manage.py serve --model-path=<folder> --model-type=qwen --port=<port>` as a new user runs
it: the whole site starts as under `make run`, with that model as the default deployment."""

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import requests

from chat.prompting import count_tokens, edge_tokenizer, render_prompt
from llmsite.embedded import _free_port
from tests.test_one_command_start import _env, _manage
from tests.tiny_models import build_tiny_model, default_tokenizer_files

BASE_DIR = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def served(stack, tmp_path_factory, django_db_blocker):
    with django_db_blocker.unblock():
        files = default_tokenizer_files()
    folder = build_tiny_model(tmp_path_factory.mktemp("serve") / "tiny-qwen2", "qwen2", files)
    data_dir = tmp_path_factory.mktemp("serve-data")
    port = _free_port()
    env = _env(data_dir)
    log_path = data_dir / "serve.log"
    command = [str(BASE_DIR / ".venv/bin/python"), "manage.py", "serve", f"--model-path={folder}", "--model-type=qwen", f"--port={port}"]
    with open(log_path, "w") as log:
        process = subprocess.Popen(
            command, cwd=BASE_DIR, env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
    deadline = time.monotonic() + 600
    try:
        while "The site is up" not in log_path.read_text():
            assert process.poll() is None, log_path.read_text()[-3000:]
            assert time.monotonic() < deadline, log_path.read_text()[-3000:]
            time.sleep(0.5)
        yield {"process": process, "url": f"http://127.0.0.1:{port}", "env": env, "log": log_path, "files": files}
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGINT)
            try:
                process.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)


def test_serve_starts_the_site_with_the_model_as_the_default_deployment(served):
    output = served["log"].read_text()
    assert served["url"] in output
    assert "default: ready" in output
    made = _manage(served["env"], "create_token", "admin")
    assert made.returncode == 0, made.stderr
    token = made.stdout.split()[-1]
    response = requests.post(f"{served['url']}/api/predict/default", headers={"Authorization": token}, json={"prompt": "Hello", "temperature": 0}, timeout=120)
    assert response.status_code == 200, response.text
    usage = response.json()["usage"]
    assert 1 <= usage["completion_tokens"]
    # The prompt was rendered in the qwen format (ChatML with Qwen's default system prompt), not in
    # the tokenizer's own template, whose default system prompt differs.
    tokenizer = edge_tokenizer(served["files"])
    messages = [{"role": "user", "content": "Hello"}]
    assert usage["prompt_tokens"] == count_tokens(tokenizer, render_prompt(tokenizer, messages, model_type="qwen"))
    assert usage["prompt_tokens"] != count_tokens(tokenizer, render_prompt(tokenizer, messages))


def test_ctrl_c_stops_the_served_site(served):
    os.killpg(served["process"].pid, signal.SIGINT)
    assert served["process"].wait(60) == 0
    assert "stopped" in served["log"].read_text()
