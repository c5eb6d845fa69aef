"""Our whole site on each of its three engines against the two peers, same model, same machine, one
run (`make bench-peers`; `make bench` runs it after bench/pipeline.py and bench/fairness.py).

Five sides, each alone (started, measured, stopped before the next: never two servers busy at once):
- `site-llamacpp`, `site-transformers`, `site-vllm`: Daphne and a Celery worker serving a copy of the
  default deployment on that engine (the vLLM worker from .venv-vllm, vLLM in bf16 where the CPU
  has bf16 instructions, else fp32: `dtype()`; its context 2048);
- `llama-server`: llama.cpp's own server (`make llama-server`: built from the llama.cpp source the
  pinned llama-cpp-python compiles, with the same flags), `-np 32` slots with continuous batching,
  the same GGUF file, thread count and context per slot as our llama.cpp engine;
- `vllm-server`: vLLM's own OpenAI server (its api_server module) with the settings our adapter
  gives vLLM (dtype, context, max_num_seqs, KV cache bytes, thread binding, compilation).

Every side is driven alike through its streaming /v1/chat/completions, 128 new tokens, greedy: a
warm-up, then one stream (BENCH_SINGLE_REQUESTS requests one after another), then 32 concurrent
streams, while the serving processes' memory is sampled (peak RSS summed over the process tree:
our worker and its engine processes; the peer server and its children).

Merges into bench/results/latest.json the peer ratios (`vllm_pipeline_vs_server_1/_32`,
`vllm_ttft_added_ms_p50`, `llamacpp_pipeline_vs_llama_server_1/_32`, `site_best_vs_best_peer_1/_32`),
`vllm_dtype`, and the raw figures per side under `peers`. `--only SIDE,...` runs some sides and
merges them with the figures already there (for development: the README's figures come from one
run of all sides).
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from datetime import datetime, timezone
from pathlib import Path

BASE_DIR = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(BASE_DIR))
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "llmsite.settings")

import django  # noqa: E402

django.setup()

import psutil  # noqa: E402
import requests  # noqa: E402
from django.conf import settings  # noqa: E402
from django.core.management import call_command  # noqa: E402

from chat.models import Deployment  # noqa: E402
from llmsite.embedded import _free_port  # noqa: E402
from llmsite.launcher import port_open, vllm_python, web_command, worker_command  # noqa: E402

NEW_TOKENS = 128
SINGLE_REQUESTS = int(os.environ.get("BENCH_SINGLE_REQUESTS", "10"))
STREAMS = 32
VLLM_CONTEXT = 2048
TOPICS = ["rivers", "volcanoes", "bread", "chess", "owls", "glaciers", "trains", "tea", "bees", "comets"]
LOGS = Path(os.environ.get("LLMSITE_DATA_DIR", BASE_DIR / "var" / "bench-peers")) / "logs"
OUT = Path(os.environ.get("BENCH_PEERS_OUT") or BASE_DIR / "bench" / "results" / "latest.json")
# This machine may be shared: a side is measured once other processes use under QUIET_CORES (waiting
# up to QUIET_WAIT_S), and again (TRIES in all) where they used more while it was measured.
QUIET_CORES = float(os.environ.get("BENCH_QUIET_CORES", "0.25"))
QUIET_WAIT_S = float(os.environ.get("BENCH_QUIET_WAIT_S", "300"))
TRIES = int(os.environ.get("BENCH_TRIES", "3"))
# More loads to measure (aggregate tok/s only), e.g. BENCH_EXTRA_STREAMS=4,8,16: where engines cross.
EXTRA_STREAMS = [int(n) for n in os.environ.get("BENCH_EXTRA_STREAMS", "").split(",") if n.strip()]
SITE_SIDES = ("site-llamacpp", "site-transformers", "site-vllm")
PEER_SIDES = ("llama-server", "vllm-server")
ORDER = ("llama-server", "site-llamacpp", "site-transformers", "vllm-server", "site-vllm")  # peers beside their engine
# ratio: (target, whether a value at or above it meets it)
TARGETS = {
    "vllm_pipeline_vs_server_1": (0.95, True),
    "vllm_pipeline_vs_server_32": (0.95, True),
    "vllm_ttft_added_ms_p50": (15, False),
    "llamacpp_pipeline_vs_llama_server_1": (None, True),
    "llamacpp_pipeline_vs_llama_server_32": (1.0, True),
    "site_best_vs_best_peer_1": (0.95, True),
    "site_best_vs_best_peer_32": (0.95, True),
}


def torch_dtype() -> str:
    """What vLLM runs a bf16 deployment in, as our adapter chooses it: bf16 on a GPU or a CPU with
    bf16 instructions, fp32 otherwise."""
    from workers.engines.vllm_setup import cpu_dtype

    return cpu_dtype("bfloat16")[0]


def dtype() -> str:
    return {"bfloat16": "bf16", "float32": "fp32"}[torch_dtype()]


# ---- processes -------------------------------------------------------------------------------


def start(name: str, command: list[str], env: dict | None = None) -> subprocess.Popen:
    LOGS.mkdir(parents=True, exist_ok=True)
    log = open(LOGS / f"{name}.log", "ab")
    return subprocess.Popen(command, cwd=BASE_DIR, env={**os.environ, **(env or {})}, stdout=log, stderr=subprocess.STDOUT)


def stop(process: subprocess.Popen) -> None:
    """Stops a process this bench started, then whatever it started that outlived it."""
    try:
        children = psutil.Process(process.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        children = []
    process.terminate()
    try:
        process.wait(60)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
    _, alive = psutil.wait_procs(children, timeout=30)
    for child in alive:
        child.kill()


def wait_for(check, process: subprocess.Popen, what: str, timeout: float = 900) -> float:
    """Seconds until `check()` holds; fails if the process exits or the timeout passes first."""
    started = time.monotonic()
    while not check():
        if process.poll() is not None or time.monotonic() - started > timeout:
            raise RuntimeError(f"{what} did not come up (see {LOGS})")
        time.sleep(1)
    return time.monotonic() - started


def healthy(url: str) -> bool:
    try:
        return requests.get(url, timeout=2).status_code == 200
    except requests.RequestException:
        return False


def tree_rss(pids: list[int]) -> int:
    """Resident bytes of these processes and all their descendants, summed."""
    total = 0
    for pid in pids:
        try:
            root = psutil.Process(pid)
            processes = [root, *root.children(recursive=True)]
        except psutil.NoSuchProcess:
            continue
        for process in processes:
            try:
                total += process.memory_info().rss
            except psutil.NoSuchProcess:
                pass
    return total


class PeakRss:
    """`with PeakRss(pids) as peak:` samples tree_rss(pids) every 0.2 s; `peak.bytes` is the highest."""

    def __init__(self, pids: list[int]):
        self.pids, self.bytes = pids, tree_rss(pids)
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while not self._done.wait(0.2):
            self.bytes = max(self.bytes, tree_rss(self.pids))

    def __enter__(self) -> "PeakRss":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._done.set()
        self._thread.join()


class ForeignCpu:
    """`with ForeignCpu() as foreign:` the CPU time spent meanwhile by everything that is not this
    bench (this machine may be shared: another user's load shows here), as `foreign.cores` (CPU
    seconds over wall seconds): the machine's busy time (steal included) less our processes'. Ours:
    the launcher's process tree (this bench, the servers it started) and the embedded PostgreSQL
    and Valkey (daemons: their command line or working folder is in the data folder)."""

    def __enter__(self) -> "ForeignCpu":
        self.started, self.busy = time.monotonic(), busy_seconds()
        self.ours = cpu_seconds(our_pids())
        return self

    def __exit__(self, *exc) -> None:
        busy, wall = busy_seconds() - self.busy, time.monotonic() - self.started
        ours = sum(t - self.ours.get(pid, 0.0) for pid, t in cpu_seconds(our_pids() | set(self.ours)).items())
        self.cores = round(max(0.0, busy - ours) / wall, 2) if wall > 0 else 0.0


def busy_seconds() -> float:
    times = psutil.cpu_times()
    return sum(getattr(times, field, 0.0) for field in ("user", "nice", "system", "irq", "softirq", "steal"))


def cpu_seconds(pids: set[int]) -> dict[int, float]:
    out = {}
    for pid in pids:
        try:
            times = psutil.Process(pid).cpu_times()
        except psutil.Error:
            continue
        out[pid] = times.user + times.system
    return out


def our_pids() -> set[int]:
    data_dir = str(LOGS.parent.resolve())
    root = psutil.Process(os.getppid())  # llmsite.launcher services
    ours = {root.pid, *(p.pid for p in root.children(recursive=True))}
    for process in psutil.process_iter(["cmdline", "cwd"]):
        if data_dir in " ".join(process.info["cmdline"] or []) or (process.info["cwd"] or "").startswith(data_dir):
            ours.add(process.pid)
    return ours


def wait_for_quiet() -> float:
    """Waits (up to QUIET_WAIT_S) until other processes use under QUIET_CORES for 5 s; seconds waited."""
    started = time.monotonic()
    while time.monotonic() - started < QUIET_WAIT_S:
        with ForeignCpu() as foreign:
            time.sleep(5)
        if foreign.cores < QUIET_CORES:
            break
    return round(time.monotonic() - started, 1)


# ---- the client ------------------------------------------------------------------------------


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


def concurrent(url: str, headers: dict, model: str, pids: list[int], streams: int = STREAMS) -> dict:
    """`streams` answers at once: their aggregate tok/s, TTFT p50, failures, and the peak RSS meanwhile."""
    results: list = [None] * streams

    def run(i):
        try:
            results[i] = one_stream(url, headers, model, i)
        except (requests.RequestException, ValueError) as exc:
            results[i] = exc

    threads = [threading.Thread(target=run, args=(i,)) for i in range(streams)]
    with PeakRss(pids) as peak:
        started = time.perf_counter()
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        wall = time.perf_counter() - started
    done = [r for r in results if isinstance(r, tuple)]
    return {
        "aggregate_32_tok_s": round(sum(t for _, t, _ in done) / wall, 2),
        "ttft_32_ms_p50": round(statistics.median(f for f, _, _ in done if f is not None) * 1000, 1),
        "failed_32": streams - len(done),
        "peak_rss_mib": round(peak.bytes / 2**20, 1),
    }


def measure(url: str, headers: dict, model: str, pids: list[int]) -> dict:
    """measure_once, after a wait for the other processes on this machine to go quiet; again (up
    to TRIES in all) where they were busy meanwhile: the figures of the quietest try, with the
    other processes' load during it (`foreign_cpu_cores`), the tries and the seconds waited."""
    best = None
    for attempt in range(1, TRIES + 1):
        waited = wait_for_quiet()
        with ForeignCpu() as foreign:
            figures = measure_once(url, headers, model, pids)
        figures.update(foreign_cpu_cores=foreign.cores, tries=attempt, quiet_wait_s=waited)
        if best is None or figures["foreign_cpu_cores"] < best["foreign_cpu_cores"]:
            best = figures
        if foreign.cores < QUIET_CORES:
            break
        print(f"  other processes used {foreign.cores} cores meanwhile: measuring again", flush=True)
    best["tries"] = attempt
    return best


def measure_once(url: str, headers: dict, model: str, pids: list[int]) -> dict:
    """A warm-up, one stream (SINGLE_REQUESTS one after another), each of EXTRA_STREAMS concurrent
    streams (aggregate tok/s only: where the engines cross), then STREAMS concurrent streams."""
    one_stream(url, headers, model, 0)
    singles = [one_stream(url, headers, model, i) for i in range(SINGLE_REQUESTS)]
    extra = {str(n): concurrent(url, headers, model, pids, n)["aggregate_32_tok_s"] for n in EXTRA_STREAMS}
    return {
        **({"aggregate_tok_s_at": extra} if extra else {}),
        "single_tok_s": round(sum(t for _, t, _ in singles) / sum(s for _, _, s in singles), 2),
        "ttft_ms_p50": round(statistics.median(f for f, _, _ in singles if f is not None) * 1000, 1),
        "idle_rss_mib": round(tree_rss(pids) / 2**20, 1),
        **concurrent(url, headers, model, pids),
    }


# ---- the sides -------------------------------------------------------------------------------


def llama_server_binary() -> Path:
    """`make llama-server`'s build for the pinned llama-cpp-python (LLAMA_SERVER overrides)."""
    pins = (BASE_DIR / "requirements" / "worker.txt").read_text().splitlines()
    version = next(line.split("==")[1].strip() for line in pins if line.startswith("llama-cpp-python=="))
    return Path(os.environ.get("LLAMA_SERVER") or BASE_DIR / "var" / f"llama.cpp-{version}" / "build" / "bin" / "llama-server")


def llama_server_side(default, token: str) -> dict:
    """llama.cpp's server on the default deployment's GGUF file: STREAMS slots (continuous batching),
    each the context our llama.cpp engine gives a request, its thread count, batch size, flash
    attention and one KV stream per sequence (no unified cache), as our engine's decoding context."""
    from workers.engines.llamacpp.config import BATCH_TOKENS, count_setting, default_threads
    from workers.engines.transformers_engine import resolve_source

    folder, gguf_file = resolve_source(default.model_source)
    slot = max(256, (default.context_length or count_setting("LLAMACPP_SEQ_TOKENS")) // 256 * 256)
    threads, port = default_threads(), _free_port()
    command = [str(llama_server_binary()), "-m", os.path.join(folder, gguf_file), "--host", "127.0.0.1", "--port", str(port),
               "-np", str(STREAMS), "-c", str(slot * STREAMS), "--no-kv-unified", "-cb", "-fa", "on",
               "-t", str(threads), "-tb", str(threads), "-b", str(BATCH_TOKENS), "-ub", str(BATCH_TOKENS), "--no-webui"]
    server = start("llama-server", command)
    try:
        ready = wait_for(lambda: healthy(f"http://127.0.0.1:{port}/health"), server, "llama-server")
        figures = measure(f"http://127.0.0.1:{port}", {}, gguf_file, [server.pid])
    finally:
        stop(server)
    return {**figures, "ready_s": round(ready, 1), "command": " ".join(command[1:])}


def vllm_env(folder: str) -> dict:
    """The CPU settings our adapter gives vLLM for a deployment like the bench's (its KV cache bytes
    and thread binding), for vLLM's own server too."""
    code = ("import os, sys; from types import SimpleNamespace as N; from workers.engines.vllm_setup import cpu_settings;"
            f"extra, _ = cpu_settings(N(name='bench', max_batch_size={STREAMS}, context_length={VLLM_CONTEXT}), sys.argv[1], sys.argv[2]);"
            "print(extra.get('kv_cache_memory_bytes', ''), os.environ.get('VLLM_CPU_OMP_THREADS_BIND', ''))")
    output = subprocess.check_output([vllm_python() or sys.executable, "-c", code, folder, torch_dtype()], cwd=BASE_DIR, text=True)
    kv_bytes, cores = output.split()[-2:]
    return {"kv_cache_memory_bytes": kv_bytes, "VLLM_CPU_OMP_THREADS_BIND": cores}


def vllm_folder(source: str) -> str:
    """The safetensors folder our vLLM adapter makes from the model source (made once, cached)."""
    code = "import sys, django; django.setup(); from workers.engines.vllm_setup import model_folder; print(model_folder(sys.argv[1]))"
    return subprocess.check_output([vllm_python() or sys.executable, "-c", code, source], cwd=BASE_DIR, text=True).strip().splitlines()[-1]


def vllm_server_side(default, token: str) -> dict:
    """vLLM's OpenAI server on the folder our adapter makes, with the settings it gives vLLM."""
    folder = vllm_folder(default.model_source)
    env = vllm_env(folder)
    port = _free_port()
    command = [vllm_python() or sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", folder, "--port", str(port),
               "--dtype", torch_dtype(), "--max-model-len", str(VLLM_CONTEXT), "--max-num-seqs", str(STREAMS),
               "--kv-cache-memory-bytes", env["kv_cache_memory_bytes"]]
    if settings.VLLM_ENFORCE_EAGER:
        command.append("--enforce-eager")
    server = start("vllm-server", command, {"VLLM_CPU_OMP_THREADS_BIND": env["VLLM_CPU_OMP_THREADS_BIND"]})
    try:
        ready = wait_for(lambda: healthy(f"http://127.0.0.1:{port}/health"), server, "vLLM's server")
        figures = measure(f"http://127.0.0.1:{port}", {}, folder, [server.pid])
    finally:
        stop(server)
    return {**figures, "ready_s": round(ready, 1), "dtype": dtype(), "compiled": not settings.VLLM_ENFORCE_EAGER, "vllm_env": env}


def site_side(default, token: str, engine: str) -> dict:
    """Daphne and one Celery worker serving a copy of the default deployment on `engine` (vLLM: the
    bench's dtype and context, the worker run by .venv-vllm's Python); the worker's process tree is
    what the memory figure covers (Daphne's peak is given apart)."""
    name = f"bench-{engine}"
    vllm = engine == Deployment.Engine.VLLM
    Deployment.objects.update_or_create(name=name, defaults=dict(
        model_source=default.model_source, model_type=default.model_type, chat_template=default.chat_template, engine=engine,
        precision=dtype() if vllm else default.precision, context_length=VLLM_CONTEXT if vllm else default.context_length,
        max_batch_size=STREAMS, max_concurrent_generations=max(default.max_concurrent_generations, 2 * STREAMS),
        max_waiting_per_user=default.max_waiting_per_user, enabled=True, status=Deployment.Status.UNKNOWN))
    python = (vllm_python() or sys.executable) if vllm else sys.executable
    command = [python, *worker_command([name], hostname=f"{name}@%h", concurrency=STREAMS * 2)[1:]]
    worker = start(f"worker-{engine}", command, {"WORKER_METRICS_PORT": str(_free_port())})
    port = _free_port()
    web = start(f"web-{engine}", web_command("127.0.0.1", port))
    try:
        ready = wait_for(lambda: Deployment.objects.get(name=name).status == Deployment.Status.READY, worker, f"the {engine} worker")
        wait_for(lambda: port_open("127.0.0.1", port), web, "Daphne")
        with PeakRss([web.pid]) as web_peak:
            figures = measure(f"http://127.0.0.1:{port}", {"Authorization": f"Bearer {token}"}, name, [worker.pid])
    finally:
        stop(web)
        stop(worker)
        Deployment.objects.filter(name=name).update(enabled=False)
    return {**figures, "ready_s": round(ready, 1), "web_peak_rss_mib": round(web_peak.bytes / 2**20, 1),
            "precision": dtype() if vllm else default.precision}


SIDES = {
    "llama-server": llama_server_side,
    "site-llamacpp": lambda default, token: site_side(default, token, "llamacpp"),
    "site-transformers": lambda default, token: site_side(default, token, "transformers"),
    "vllm-server": vllm_server_side,
    "site-vllm": lambda default, token: site_side(default, token, "vllm"),
}
LABELS = {
    "site-llamacpp": "site, llamacpp engine", "site-transformers": "site, transformers engine", "site-vllm": "site, vllm engine",
    "llama-server": f"llama-server (-np {STREAMS})", "vllm-server": "vLLM's OpenAI server",
}


# ---- ratios and tables -----------------------------------------------------------------------


def ratios(sides: dict) -> dict:
    """The peer ratios from the figures of each side (those that can be computed)."""

    def get(side, key):
        return sides.get(side, {}).get(key)

    out = {}
    for name, ours, theirs, key in (
        ("vllm_pipeline_vs_server_1", "site-vllm", "vllm-server", "single_tok_s"),
        ("vllm_pipeline_vs_server_32", "site-vllm", "vllm-server", "aggregate_32_tok_s"),
        ("llamacpp_pipeline_vs_llama_server_1", "site-llamacpp", "llama-server", "single_tok_s"),
        ("llamacpp_pipeline_vs_llama_server_32", "site-llamacpp", "llama-server", "aggregate_32_tok_s"),
    ):
        if get(ours, key) and get(theirs, key):
            out[name] = round(get(ours, key) / get(theirs, key), 3)
    if get("site-vllm", "ttft_ms_p50") is not None and get("vllm-server", "ttft_ms_p50") is not None:
        out["vllm_ttft_added_ms_p50"] = round(get("site-vllm", "ttft_ms_p50") - get("vllm-server", "ttft_ms_p50"), 1)
    for load, key in ((1, "single_tok_s"), (32, "aggregate_32_tok_s")):
        site = max((s for s in SITE_SIDES if get(s, key)), key=lambda s: get(s, key), default=None)
        peer = max((s for s in PEER_SIDES if get(s, key)), key=lambda s: get(s, key), default=None)
        if site and peer:
            out[f"site_best_vs_best_peer_{load}"] = round(get(site, key) / get(peer, key), 3)
            out[f"site_best_{load}"], out[f"best_peer_{load}"] = site, peer
    return out


def verdict(name: str, value: float) -> str:
    target, at_least = TARGETS[name]
    if target is None:
        return "—", ""
    met = value >= target if at_least else value <= target
    return f"{'≥' if at_least else '≤'} {target}", "met" if met else "not met"


def print_tables(results: dict) -> None:
    sides = results["peers"]
    print(f"\n{NEW_TOKENS} new tokens a request, greedy; 1 stream = {SINGLE_REQUESTS} requests one after another; vLLM {results['vllm_dtype']}")
    print("| ratio | value | target | |\n|---|---|---|---|")
    for name in TARGETS:
        if name in results:
            print(f"| {name} | {results[name]} | {' | '.join(verdict(name, results[name]))} |")
    for load in (1, 32):
        if f"site_best_{load}" in results:
            print(f"| best at {load}: site / peer | {results[f'site_best_{load}']} / {results[f'best_peer_{load}']} | | |")
    if "aggregate_32_vs_1" in results:
        print(f"| aggregate_32_vs_1 (bench/pipeline.py; retired target) | {results['aggregate_32_vs_1']} | — | |")
    print("\n| engine | 1 stream tok/s | 32 streams tok/s | TTFT p50 ms, 1 stream | TTFT p50 ms, 32 | peak RSS MiB | ready s | other load, cores |")
    print("|---|---|---|---|---|---|---|---|")
    for side in ORDER:
        f = sides.get(side)
        if f and "error" not in f:
            print(f"| {LABELS[side]} | {f['single_tok_s']} | {f['aggregate_32_tok_s']} | {f['ttft_ms_p50']} | {f['ttft_32_ms_p50']} "
                  f"| {f['peak_rss_mib']} | {f['ready_s']} | {f.get('foreign_cpu_cores', '—')} |")
        elif f:
            print(f"| {LABELS[side]} | failed: {f['error']} | | | | | | |")


def bench_token() -> str:
    from django.contrib.auth import get_user_model

    from chat.tokens import token_create

    user, _ = get_user_model().objects.get_or_create(username="bench-peers")
    return token_create(user=user)[1]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", default=",".join(ORDER), help=f"sides to run, comma-separated (default: all: {','.join(ORDER)})")
    sides = [s.strip() for s in parser.parse_args(argv).only.split(",") if s.strip()]
    if set(sides) - set(ORDER):
        parser.error(f"unknown sides: {', '.join(sorted(set(sides) - set(ORDER)))} (known: {', '.join(ORDER)})")
    call_command("migrate", interactive=False, verbosity=0)
    call_command("setup_site", "--no-admin", verbosity=0)
    default, token = Deployment.objects.get(name="default"), bench_token()
    previous = json.loads(OUT.read_text()) if OUT.exists() else {}
    figures, failed = dict(previous.get("peers", {})), False
    for side in (s for s in ORDER if s in sides):
        print(f"{side}: start, warm-up, 1 stream x {SINGLE_REQUESTS}, {STREAMS} streams…", flush=True)
        try:
            figures[side] = SIDES[side](default, token)
        except Exception as exc:  # reported in the table and the JSON; the other sides still run
            figures[side], failed = {"error": f"{type(exc).__name__}: {exc}"}, True
        figures[side]["measured_at"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
        print(f"  {json.dumps(figures[side])}", flush=True)
    kept = {k: v for k, v in previous.items() if k not in TARGETS and not k.startswith(("site_best_", "best_peer_"))}
    results = {**kept, **ratios(figures), "vllm_dtype": dtype(), "peers": figures}
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(results, indent=2) + "\n")
    print_tables(results)
    print(f"\nwritten to {OUT}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
