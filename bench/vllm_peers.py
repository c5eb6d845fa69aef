"""Our pipeline on the vllm engine against vLLM's own OpenAI server, same model, same machine, same
run (`make bench-vllm`; `make bench` can call it after bench/pipeline.py).

Both are driven alike through their streaming /v1/chat/completions, 128 new tokens, at 1 stream
(one request after another) and at 32 concurrent streams; each side runs alone (never both at
once: their threads would fight), with the same vLLM settings (dtype, context, max_num_seqs, KV
cache space, thread binding, compilation on). Merges into bench/results/latest.json:
`vllm_pipeline_vs_server_1`, `vllm_pipeline_vs_server_32` (output tokens/s, ours over vLLM's
server), `vllm_ttft_added_ms_p50` (our time to the first token p50 minus the server's, one
stream), the raw figures under `vllm_peers`, and the dtype vLLM ran.
"""

import json
import os
import statistics
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

BASE_DIR = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(BASE_DIR))
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "llmsite.settings")

import django  # noqa: E402

django.setup()

import requests  # noqa: E402
from django.core.management import call_command  # noqa: E402

from chat.models import Deployment  # noqa: E402
from llmsite.embedded import _free_port  # noqa: E402
from llmsite.launcher import port_open, vllm_python, web_command, worker_command  # noqa: E402

NEW_TOKENS = 128
SINGLE_REQUESTS = int(os.environ.get("BENCH_SINGLE_REQUESTS", "10"))
STREAMS = 32
CONTEXT = 2048
TOPICS = ["rivers", "volcanoes", "bread", "chess", "owls", "glaciers", "trains", "tea", "bees", "comets"]
LOGS = BASE_DIR / "var" / "bench" / "logs"


def dtype() -> str:
    """bf16 where the CPU has bf16 instructions (or on a GPU), fp32 otherwise."""
    flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    return "bf16" if ("avx512_bf16" in flags or "amx_bf16" in flags or os.path.exists("/dev/nvidia0")) else "fp32"


def start(name: str, command: list[str], env: dict) -> subprocess.Popen:
    LOGS.mkdir(parents=True, exist_ok=True)
    log = open(LOGS / f"{name}.log", "ab")
    return subprocess.Popen(command, cwd=BASE_DIR, env={**os.environ, **env}, stdout=log, stderr=subprocess.STDOUT)


def stop(process: subprocess.Popen) -> None:
    process.terminate()
    try:
        process.wait(60)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def wait_for(check, process: subprocess.Popen, what: str, timeout: float = 900) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if process.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"{what} did not come up (see {LOGS})")
        time.sleep(1)


def one_stream(url: str, headers: dict, model: str, i: int) -> tuple[float | None, int, float]:
    """(seconds to the first content, completion tokens, seconds in all) of one streamed answer."""
    body = {"model": model, "messages": [{"role": "user", "content": f"Write a long story about {TOPICS[i % len(TOPICS)]}."}],
            "max_tokens": NEW_TOKENS, "temperature": 0, "stream": True, "stream_options": {"include_usage": True}}
    started, first, tokens = time.perf_counter(), None, 0
    with requests.post(f"{url}/v1/chat/completions", headers=headers, json=body, stream=True, timeout=600) as response:
        response.raise_for_status()
        for line in response.iter_lines():
            if not line.startswith(b"data: ") or line == b"data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if first is None and chunk.get("choices") and chunk["choices"][0].get("delta", {}).get("content"):
                first = time.perf_counter() - started
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
    return first, tokens, time.perf_counter() - started


def measure(url: str, headers: dict, model: str) -> dict:
    one_stream(url, headers, model, 0)  # warm
    singles = [one_stream(url, headers, model, i) for i in range(SINGLE_REQUESTS)]
    results: list = [None] * STREAMS

    def run(i):
        results[i] = one_stream(url, headers, model, i)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(STREAMS)]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - started
    return {
        "single_tok_s": sum(t for _, t, _ in singles) / sum(s for _, _, s in singles),
        "ttft_ms_p50": statistics.median(f for f, _, _ in singles if f is not None) * 1000,
        "aggregate_32_tok_s": sum(t for _, t, _ in results) / wall,
        "ttft_32_ms_p50": statistics.median(f for f, _, _ in results if f is not None) * 1000,
    }


def vllm_env(folder: str) -> dict:
    """The CPU settings our adapter gives vLLM for this deployment (its KV cache bytes and thread
    binding), for vLLM's own server too."""
    code = ("import os, sys; from types import SimpleNamespace as N; from workers.engines.vllm_setup import cpu_settings;"
            f"extra, _ = cpu_settings(N(name='bench', max_batch_size={STREAMS}, context_length={CONTEXT}), sys.argv[1], sys.argv[2]);"
            "print(extra.get('kv_cache_memory_bytes', ''), os.environ.get('VLLM_CPU_OMP_THREADS_BIND', ''))")
    dtypes = {"bf16": "bfloat16", "fp32": "float32"}
    output = subprocess.check_output([vllm_python() or sys.executable, "-c", code, folder, dtypes[dtype()]], cwd=BASE_DIR, text=True)
    kv_bytes, cores = output.split()[-2:]
    return {"kv_cache_memory_bytes": kv_bytes, "VLLM_CPU_OMP_THREADS_BIND": cores}


def model_folder(source: str) -> str:
    code = "import sys, django; django.setup(); from workers.engines.vllm_setup import model_folder; print(model_folder(sys.argv[1]))"
    return subprocess.check_output([vllm_python() or sys.executable, "-c", code, source], cwd=BASE_DIR, text=True).strip().splitlines()[-1]


def server_side(folder: str, env: dict) -> dict:
    port = _free_port()
    command = [vllm_python() or sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", folder, "--port", str(port),
               "--dtype", {"bf16": "bfloat16", "fp32": "float32"}[dtype()], "--max-model-len", str(CONTEXT), "--max-num-seqs", str(STREAMS),
               "--kv-cache-memory-bytes", env["kv_cache_memory_bytes"]]
    server = start("vllm-server", command, {"VLLM_CPU_OMP_THREADS_BIND": env["VLLM_CPU_OMP_THREADS_BIND"]})
    try:
        wait_for(lambda: _healthy(f"http://127.0.0.1:{port}/health"), server, "vLLM's server")
        return measure(f"http://127.0.0.1:{port}", {}, folder)
    finally:
        stop(server)


def _healthy(url: str) -> bool:
    try:
        return requests.get(url, timeout=2).status_code == 200
    except requests.RequestException:
        return False


def pipeline_side(source: str) -> dict:
    from chat.tokens import token_create
    from django.contrib.auth import get_user_model

    name = f"bench-vllm-{uuid.uuid4().hex[:6]}"
    Deployment.objects.create(name=name, model_source=source, engine="vllm", precision=dtype(), context_length=CONTEXT,
                              max_batch_size=STREAMS, max_concurrent_generations=STREAMS * 2)
    user = get_user_model().objects.create_user(f"bench-{uuid.uuid4().hex[:8]}")
    token = token_create(user=user)[1]
    worker = start("vllm-worker", [vllm_python() or sys.executable, *worker_command([name], hostname=f"{name}@%h", concurrency=STREAMS * 2)[1:]],
                   {"WORKER_METRICS_PORT": str(_free_port())})  # the adapter sets the same vLLM settings itself
    port = _free_port()
    web = start("web", web_command("127.0.0.1", port), {})
    try:
        wait_for(lambda: Deployment.objects.get(name=name).status == Deployment.Status.READY, worker, "the vllm worker")
        wait_for(lambda: port_open("127.0.0.1", port), web, "Daphne")
        return measure(f"http://127.0.0.1:{port}", {"Authorization": f"Bearer {token}"}, name)
    finally:
        stop(web)
        stop(worker)
        Deployment.objects.filter(name=name).update(enabled=False)


def main() -> int:
    call_command("migrate", interactive=False, verbosity=0)
    call_command("setup_site", "--no-admin", verbosity=0)
    source = Deployment.objects.get(name="default").model_source
    folder = model_folder(source)
    env = vllm_env(folder)
    server = server_side(folder, env)
    ours = pipeline_side(source)
    results = {
        "vllm_pipeline_vs_server_1": ours["single_tok_s"] / server["single_tok_s"],
        "vllm_pipeline_vs_server_32": ours["aggregate_32_tok_s"] / server["aggregate_32_tok_s"],
        "vllm_ttft_added_ms_p50": ours["ttft_ms_p50"] - server["ttft_ms_p50"],
        "vllm_peers": {"pipeline": ours, "vllm_server": server, "dtype": dtype(), "vllm_env": env, "new_tokens": NEW_TOKENS},
    }
    out = BASE_DIR / "bench" / "results" / "latest.json"
    merged = {**(json.loads(out.read_text()) if out.exists() else {}), **results}
    out.write_text(json.dumps(merged, indent=2) + "\n")
    for key in ("vllm_pipeline_vs_server_1", "vllm_pipeline_vs_server_32", "vllm_ttft_added_ms_p50"):
        print(f"{key:32} {results[key]:10.3f}")
    print(json.dumps(results["vllm_peers"], indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
