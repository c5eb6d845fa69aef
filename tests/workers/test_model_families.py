"""Every architecture transformers implements natively loads in a real worker from a local folder and
streams through the predict API and the WebSocket; models that cannot load leave their deployment
failed with the reason, and the same worker process keeps serving its other queues.

One extra worker serves every deployment of this module (one queue each). The tiny models have
random weights, so the tests look at streaming events and token counts, not at the text.
"""

import json
import shutil
import time
import uuid

import pytest
import requests
import websocket

from chat.models import Deployment, RequestLog
from llmsite.launcher import worker_command
from tests.chat import clients
from tests.conftest import Process
from tests.tiny_models import ARCHITECTURES, always_emitting, build_tiny_model, default_tokenizer_files, with_remote_code

MAX_NEW = 8
LOAD_TIMEOUT = 600

# deployment suffix -> the reason its load fails, as the admin and the client see it
FAILURES = {
    "missing": "no such model folder or file",
    "unknown-arch": "unknown architecture",
    "remote-off": "remote code not allowed",
    "oom": "out of memory",
}


def _oom_folder(folder, tokenizer_files):
    """A config whose embedding alone is 4 TiB: allocating it fails at once, with no memory touched."""
    from safetensors.torch import save_file
    from transformers import LlamaConfig

    folder.mkdir()
    LlamaConfig(vocab_size=2**22, hidden_size=2**18, intermediate_size=16, num_hidden_layers=1, num_attention_heads=1).save_pretrained(folder)
    for name, text in tokenizer_files.items():
        (folder / name).write_text(text)
    save_file({}, str(folder / "model.safetensors"), metadata={"format": "pt"})
    return folder


@pytest.fixture(scope="module")
def families(stack, tmp_path_factory, django_db_blocker):
    """Deployments of the tiny models and of the unloadable folders, and one worker for all of them."""
    root = tmp_path_factory.mktemp("families")
    prefix = f"fam-{uuid.uuid4().hex[:6]}"
    with django_db_blocker.unblock():
        files = default_tokenizer_files()
        sources = {}
        for arch in ARCHITECTURES:
            sources[arch] = dict(model_source=str(build_tiny_model(root / arch, arch, files)), model_type=ARCHITECTURES[arch])
        sources["llama"]["precision"] = Deployment.Precision.FP16  # on a CPU: falls back, with a note
        remote = with_remote_code(build_tiny_model(root / "remote", "llama", files))
        sources["remote-on"] = dict(model_source=str(remote), trust_remote_code=True)
        sources["remote-off"] = dict(model_source=str(remote))
        sources["nul"] = dict(model_source=str(always_emitting(build_tiny_model(root / "nul", "llama", files), "\x00")))
        sources["missing"] = dict(model_source=str(root / "no-such-folder"))
        unknown = root / "unknown-arch"
        shutil.copytree(root / "llama", unknown)
        config = json.loads((unknown / "config.json").read_text())
        config.update(model_type="nosucharch", architectures=["NoSuchForCausalLM"])
        (unknown / "config.json").write_text(json.dumps(config))
        sources["unknown-arch"] = dict(model_source=str(unknown))
        sources["oom"] = dict(model_source=str(_oom_folder(root / "oom", files)))

        names = {}
        for kind, fields in sources.items():
            deployment = Deployment.objects.create(
                name=f"{prefix}-{kind}", default_max_new_tokens=MAX_NEW, default_temperature=0, **fields
            )
            names[kind] = deployment.name
        worker = Process(
            f"worker-{prefix}", worker_command(sorted(names.values()), hostname=f"{prefix}@%h", concurrency=8)
        ).start()
        deadline = time.monotonic() + LOAD_TIMEOUT
        try:
            while Deployment.objects.filter(name__in=names.values()).exclude(
                status__in=[Deployment.Status.READY, Deployment.Status.FAILED]
            ).exists():
                assert worker.alive(), worker.log_tail()
                assert time.monotonic() < deadline, worker.log_tail()
                time.sleep(0.5)
            yield {"names": names, "worker": worker}
        finally:
            worker.stop()
            # No later test (health checks, model lists) should meet these deployments.
            Deployment.objects.filter(name__in=names.values()).update(enabled=False)


def _deployment(families, kind) -> Deployment:
    return Deployment.objects.get(name=families["names"][kind])


def _stream_http(stack, token, name):
    response = requests.post(
        stack.predict_url(name),
        headers={"Authorization": token},
        json={"prompt": "Hello there", "system_prompt": "Be brief.", "history": [["Hi", "Hello!"]], "use_stream_chat": True},
        stream=True,
        timeout=120,
    )
    assert response.status_code == 200, response.text
    events = [json.loads(chunk) for chunk in response.iter_lines(delimiter=b"\0") if chunk]
    return events


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_tiny_model_of_each_architecture_streams_over_http(stack, token, user, families, arch):
    deployment = _deployment(families, arch)
    assert deployment.status == Deployment.Status.READY, deployment.status_detail
    events = _stream_http(stack, token, deployment.name)
    assert all("error" not in e for e in events), events
    assert len(events) >= 2, "the answer was not streamed"
    for before, after in zip(events, events[1:]):
        assert after["response"].startswith(before["response"])
    row = RequestLog.objects.get(user=user, deployment=deployment)
    assert row.status == RequestLog.Status.OK
    assert row.response == events[-1]["response"]
    assert row.prompt_tokens > 0 and 2 <= row.completion_tokens <= MAX_NEW


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_tiny_model_of_each_architecture_streams_over_websocket(stack, token, user, families, arch):
    deployment = _deployment(families, arch)
    ws = websocket.create_connection(stack.predict_ws_url(deployment.name), header=[f"Authorization: {token}"], timeout=120)
    try:
        ws.send(json.dumps({"prompt": "Hello there", "system_prompt": "Be brief."}))
        deltas = []
        while (message := clients.receive(ws)) != "<EOS>":
            assert not message.startswith('{"error"'), message
            deltas.append(message)
    finally:
        ws.close()
    assert len(deltas) >= 2, "the answer was not streamed"
    row = RequestLog.objects.get(user=user, deployment=deployment)
    assert row.status == RequestLog.Status.OK and row.protocol == "websocket"
    assert row.response == "".join(deltas)
    assert 2 <= row.completion_tokens <= MAX_NEW


def test_fp16_on_a_cpu_falls_back_and_says_so(families):
    deployment = _deployment(families, "llama")
    assert deployment.status == Deployment.Status.READY
    assert "fp16 asked" in deployment.status_detail


def test_folder_with_remote_code_is_refused_while_the_switch_is_off_and_loads_with_it_on(stack, token, families):
    refused = _deployment(families, "remote-off")
    assert refused.status == Deployment.Status.FAILED
    assert "remote code not allowed" in refused.status_detail
    assert "auto_map" in refused.status_detail and "trust_remote_code is off" in refused.status_detail
    trusted = _deployment(families, "remote-on")
    assert trusted.status == Deployment.Status.READY, trusted.status_detail
    events = _stream_http(stack, token, trusted.name)
    assert events and "error" not in events[-1], events


@pytest.mark.parametrize("kind", sorted(FAILURES))
def test_load_failure_marks_the_deployment_failed_with_the_reason(stack, token, families, kind):
    deployment = _deployment(families, kind)
    assert deployment.status == Deployment.Status.FAILED
    assert FAILURES[kind] in deployment.status_detail
    # A client of the failed deployment is told why; nothing hangs.
    response = requests.post(stack.predict_url(deployment.name), headers={"Authorization": token}, json={"prompt": "Hi"}, timeout=120)
    assert response.status_code >= 500
    assert FAILURES[kind] in response.json()["error"]["message"]


def test_worker_stays_up_and_serves_its_other_queues_after_the_failures(stack, token, families):
    assert families["worker"].alive()
    assert Deployment.objects.filter(name__in=families["names"].values(), status=Deployment.Status.FAILED).count() == len(FAILURES)
    response = requests.post(
        stack.predict_url(families["names"]["qwen2"]), headers={"Authorization": token}, json={"prompt": "Hi"}, timeout=120
    )
    assert response.status_code == 200, response.text
    assert 1 <= response.json()["usage"]["completion_tokens"] <= MAX_NEW
    assert families["worker"].alive()


def test_an_answer_of_nul_characters_is_stored_and_ends_cleanly(stack, token, user, families):
    # A byte-level token for NUL is a real model output; PostgreSQL text cannot hold it.
    deployment = _deployment(families, "nul")
    response = requests.post(stack.predict_url(deployment.name), headers={"Authorization": token}, json={"prompt": "Hi"}, timeout=120)
    assert response.status_code == 200, response.text
    assert response.json()["usage"]["completion_tokens"] == MAX_NEW
    row = RequestLog.objects.get(user=user, deployment=deployment)
    assert row.status == RequestLog.Status.OK
    assert row.completion_tokens == MAX_NEW and "\x00" not in row.response
