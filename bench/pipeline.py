"""Throughput and overhead of the serving pipeline, as ratios measured in one run (`make bench`).

One stream at a time, each prompt goes through the default model's engine in-process, through
llama.cpp itself (the peer) and through the predict API (a real Celery worker and Daphne) in turn;
then 1/4/8/16/32 concurrent streams through the API. Prints one table and writes
bench/results/latest.json. `make bench` starts PostgreSQL and Redis for it in var/bench.
"""

import importlib.util
import json
import os
import platform
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
import django.utils.timezone  # noqa: E402

django.setup()

import psutil  # noqa: E402
import requests  # noqa: E402
from django.core.management import call_command  # noqa: E402

from llmsite.contract import SamplingParams  # noqa: E402
from chat.models import Deployment, RequestLog  # noqa: E402
from chat.prompting import render_prompt  # noqa: E402
from llmsite.embedded import _free_port  # noqa: E402
from llmsite.launcher import port_open, web_command, worker_command  # noqa: E402

NEW_TOKENS = int(os.environ.get("BENCH_NEW_TOKENS", "128"))
SINGLE_REQUESTS = int(os.environ.get("BENCH_SINGLE_REQUESTS", "20"))
CONCURRENCY = [int(c) for c in os.environ.get("BENCH_CONCURRENCY", "1,4,8,16,32").split(",")]  # ends with 32 for the ratios
TOPICS = ["rivers", "volcanoes", "bread", "chess", "owls", "glaciers", "trains", "tea", "bees", "comets",
          "deserts", "violins", "coral", "maps", "salt", "kites", "caves", "clocks", "wolves", "paper"]


def prompt_for(i: int) -> str:
    return f"Write a short paragraph about {TOPICS[i % len(TOPICS)]}."


def greedy() -> SamplingParams:
    # Greedy with EOS ignored would be ideal; greedy answers of these prompts run past NEW_TOKENS.
    return SamplingParams(max_new_tokens=NEW_TOKENS, temperature=0, top_k=0, top_p=1.0, do_sample=False)


def device_name() -> str:
    import torch

    if torch.cuda.is_available():
        return f"gpu: {torch.cuda.get_device_name(0)}"
    model = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), platform.processor())
    return f"cpu: {model} ({os.cpu_count()} cores)"


class InProcessEngine:
    """The deployment's engine in this process, asked one prompt at a time."""

    def __init__(self, deployment):
        from workers.engines import engine_class

        self.engine = engine_class(deployment.engine)(deployment)
        self.ask(0)  # warm-up

    def prompt(self, i: int) -> str:
        return render_prompt(self.engine.tokenizer, [{"role": "user", "content": prompt_for(i)}])

    def prompt_ids(self, i: int) -> list[int]:
        return self.engine.tokenizer(self.prompt(i), add_special_tokens=False)["input_ids"]

    def ask(self, i: int) -> tuple[int, float, float]:
        """(output tokens, TTFT, wall seconds) of prompt i."""
        from workers.engines.base import GenerationResult

        result, sent, first = GenerationResult(), time.perf_counter(), None
        for _ in self.engine.stream(self.prompt(i), greedy(), result, lambda: False):
            first = first or time.perf_counter()
        return result.completion_tokens, first - sent, time.perf_counter() - sent

    def close(self):
        self.engine.scheduler.stop()


class Peer:
    """The peer: llama.cpp itself (llama-cpp-python's Llama) on the same GGUF file and prompt
    tokens, greedy, the same thread count as our engine. It runs in a process of its own, so that
    neither shares an OpenMP runtime with the other (loaded in one process before OMP_WAIT_POLICY
    was set, both ran at a third of their speed: see llmsite/__init__.py)."""

    def __init__(self, deployment):
        import multiprocessing

        from workers.engines.llamacpp.config import default_threads
        from workers.engines.transformers_engine import resolve_source

        folder, gguf_file = resolve_source(deployment.model_source)
        context = multiprocessing.get_context("spawn")
        self.conn, theirs = context.Pipe()
        self.process = context.Process(
            target=_peer_process, args=(theirs, os.path.join(folder, gguf_file), default_threads()), daemon=True
        )
        self.process.start()
        if self.conn.recv() != "ready":
            raise SystemExit("the llama.cpp peer did not start")

    @staticmethod
    def available(deployment) -> bool:
        from workers.engines.transformers_engine import resolve_source

        return importlib.util.find_spec("llama_cpp") is not None and bool(resolve_source(deployment.model_source)[1])

    def ask(self, ids: list[int]) -> tuple[int, float]:
        """(output tokens, wall seconds) of one prompt."""
        self.conn.send(ids)
        return self.conn.recv()

    def close(self):
        self.conn.send(None)
        self.process.join(30)


def _peer_process(conn, path: str, threads: int) -> None:
    from llama_cpp import Llama

    llm = Llama(model_path=path, n_ctx=4096, n_threads=threads, n_threads_batch=threads, verbose=False)
    llm.create_completion([1, 2, 3], max_tokens=8, temperature=0.0)  # warm-up
    conn.send("ready")
    while (ids := conn.recv()) is not None:
        sent = time.perf_counter()
        # no reset: llama-cpp-python reuses the KV rows of the prefix this prompt shares with the
        # one before, as our engine keeps the prefix consecutive prompts share
        out = llm.create_completion(ids, max_tokens=NEW_TOKENS, temperature=0.0, top_k=1)
        conn.send((out["usage"]["completion_tokens"], time.perf_counter() - sent))


class Stack:
    def __init__(self):
        self.port = _free_port()
        logs = Path(os.environ["LLMSITE_DATA_DIR"]) / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        self.worker = subprocess.Popen(
            worker_command(["default"], hostname="bench@%h", concurrency=40), cwd=BASE_DIR,
            stdout=open(logs / "worker.log", "wb"), stderr=subprocess.STDOUT,
        )
        self.web = subprocess.Popen(
            web_command("127.0.0.1", self.port), cwd=BASE_DIR, stdout=open(logs / "web.log", "wb"), stderr=subprocess.STDOUT
        )
        self.url = f"http://127.0.0.1:{self.port}/api/predict/default"
        while not port_open("127.0.0.1", self.port):
            time.sleep(0.2)
        while Deployment.objects.get(name="default").status != Deployment.Status.READY:
            if self.worker.poll() is not None:
                raise SystemExit("the worker died while loading; see var/bench/logs/worker.log")
            time.sleep(0.5)
        time.sleep(2)  # let Celery start consuming

    def rss(self) -> int:
        return psutil.Process(self.worker.pid).memory_info().rss

    def stop(self):
        for process in (self.web, self.worker):
            process.terminate()
            process.wait(30)


def stream_once(url, token, prompt):
    """One streamed predict request: (TTFT, final text, wall seconds from sent to its last token)."""
    body = {"prompt": prompt, "temperature": 0, "do_sample": False, "max_new_tokens": NEW_TOKENS, "use_stream_chat": True}
    sent = time.perf_counter()
    first, last = None, None
    with requests.post(url, headers={"Authorization": token}, json=body, stream=True, timeout=600) as response:
        for chunk in response.iter_lines(chunk_size=8192, decode_unicode=False, delimiter=b"\0"):
            if chunk:
                first = first or time.perf_counter()
                last = json.loads(chunk)
    if last is None or "error" in last:
        raise RuntimeError(f"stream failed: {last}")
    return first - sent, last["response"], time.perf_counter() - sent


RECEIVED: list[str] = []  # every final text a client received, for tokens_lost


def bench_single(stack, token, engine: InProcessEngine, peer: Peer | None) -> dict:
    """One stream at a time, the same prompt through the engine in-process, the peer and the
    predict API in turn, prompt by prompt: the machine's drift (this VM's speed moves +-20% over
    minutes) falls on all three alike. Each tok/s is output tokens over the summed wall time of
    its requests (each from sent to its last token)."""
    RECEIVED.append(stream_once(stack.url, token, prompt_for(0))[1])  # warm-up
    since = django.utils.timezone.now()
    walls = {"engine": 0.0, "peer": 0.0, "pipeline": 0.0}
    tokens = {"engine": 0, "peer": 0}
    ttft = {"engine": [], "pipeline": []}
    for i in range(SINGLE_REQUESTS):
        n, first, wall = engine.ask(i)
        tokens["engine"] += n
        walls["engine"] += wall
        ttft["engine"].append(first)
        if peer is not None:
            n, wall = peer.ask(engine.prompt_ids(i))
            tokens["peer"] += n
            walls["peer"] += wall
        first, text, wall = stream_once(stack.url, token, prompt_for(i))
        walls["pipeline"] += wall
        ttft["pipeline"].append(first)
        RECEIVED.append(text)
    tokens["pipeline"] = sum(RequestLog.objects.filter(queued_at__gte=since).values_list("completion_tokens", flat=True))
    rate = {k: tokens[k] / walls[k] if walls[k] else None for k in walls}
    return {"tok_s": rate, "ttft": ttft}


def bench_concurrent(stack, token, clients: int, rounds: int = 2):
    peak = [stack.rss()]
    done = threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], stack.rss())
            time.sleep(0.2)

    sampler = threading.Thread(target=sample)
    sampler.start()
    errors = []

    def client(n):
        for r in range(rounds):
            try:
                RECEIVED.append(stream_once(stack.url, token, prompt_for(n * rounds + r))[1])
            except Exception as exc:  # counted, reported
                errors.append(exc)

    threads = [threading.Thread(target=client, args=(n,)) for n in range(clients)]
    since = time.perf_counter()
    wall_start = django.utils.timezone.now()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - since
    done.set()
    sampler.join()
    tokens = sum(RequestLog.objects.filter(queued_at__gte=wall_start).values_list("completion_tokens", flat=True))
    return {"tok_s": tokens / wall, "rss": peak[0], "errors": len(errors)}


def tokens_lost(user) -> int:
    """Tokens of every answer the worker produced (stored rows) that no client received whole."""
    from collections import Counter

    received = Counter(RECEIVED)
    lost = 0
    for row in RequestLog.objects.filter(user=user):
        if received[row.response] > 0 and row.status == RequestLog.Status.OK:
            received[row.response] -= 1
        else:
            lost += row.completion_tokens or 0
    return lost


def percentile(values, q):
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q / 100 * (len(values) - 1))))]


def main():
    from django.contrib.auth import get_user_model

    from chat.tokens import token_create

    call_command("migrate", interactive=False, verbosity=0)
    call_command("setup_site", "--no-admin", verbosity=0)
    deployment = Deployment.objects.get(name="default")
    user = get_user_model().objects.create_user(f"bench-{uuid.uuid4().hex[:6]}")
    token = token_create(user=user)[1]

    print("loading the engine in-process and the peer (llama.cpp itself), starting a worker and Daphne…", flush=True)
    engine = InProcessEngine(deployment)
    deployment.refresh_from_db()
    peer = Peer(deployment) if Peer.available(deployment) else None
    stack = Stack()
    try:
        print(f"one stream at a time: {SINGLE_REQUESTS} prompts of {NEW_TOKENS} greedy tokens, each through the engine, "
              "the peer and the predict API in turn…", flush=True)
        single = bench_single(stack, token, engine, peer)
        engine.close()
        if peer is not None:
            peer.close()
        aggregate, rss = {}, {}
        for clients in CONCURRENCY:
            print(f"pipeline: {clients} concurrent streams…", flush=True)
            result = bench_concurrent(stack, token, clients)
            aggregate[clients], rss[clients] = result["tok_s"], result["rss"]
            if result["errors"]:
                print(f"  {result['errors']} requests failed", flush=True)
    finally:
        stack.stop()

    rate = single["tok_s"]
    engine_tok_s, pipeline_tok_s, peer_tok_s = rate["engine"], rate["pipeline"], rate["peer"]
    added = [p - e for p, e in zip(single["ttft"]["pipeline"], single["ttft"]["engine"])]
    results = {
        "device": device_name(),
        "new_tokens": NEW_TOKENS,
        "engine_single_tok_s": round(engine_tok_s, 2),
        "pipeline_single_tok_s": round(pipeline_tok_s, 2),
        "pipeline_vs_engine": round(pipeline_tok_s / engine_tok_s, 3),
        "ttft_engine_ms_p50": round(1000 * statistics.median(single["ttft"]["engine"]), 1),
        "ttft_added_ms_p50": round(1000 * statistics.median(added), 1),
        "ttft_added_ms_p99": round(1000 * percentile(added, 99), 1),
        "aggregate_tok_s": {str(c): round(v, 2) for c, v in aggregate.items()},
        "aggregate_32_vs_1": round(aggregate[CONCURRENCY[-1]] / aggregate[1], 2),
        "rss_32_vs_1": round(rss[CONCURRENCY[-1]] / rss[1], 3),
        "tokens_lost": tokens_lost(user),
        "engine": deployment.engine,
    }
    if peer_tok_s:
        results.update(
            peer_llamacpp_single_tok_s=round(peer_tok_s, 2),
            engine_single_vs_llamacpp=round(engine_tok_s / peer_tok_s, 3),
            pipeline_single_vs_llamacpp=round(pipeline_tok_s / peer_tok_s, 3),
            aggregate_32_vs_llamacpp_single=round(aggregate[CONCURRENCY[-1]] / peer_tok_s, 2),
        )
    out = BASE_DIR / "bench" / "results"
    out.mkdir(parents=True, exist_ok=True)
    (out / "latest.json").write_text(json.dumps(results, indent=2) + "\n")

    print()
    print(f"device: {results['device']}; engine {deployment.engine}; {NEW_TOKENS} new tokens a request, greedy")
    print("| measure | value |")
    print("|---|---|")
    for key in ("engine_single_tok_s", "pipeline_single_tok_s", "pipeline_vs_engine", "ttft_engine_ms_p50",
                "ttft_added_ms_p50", "ttft_added_ms_p99"):
        print(f"| {key} | {results[key]} |")
    for clients, value in results["aggregate_tok_s"].items():
        print(f"| aggregate_tok_s at {clients} streams | {value} ({value / aggregate[1]:.2f}x of 1) |")
    for key in ("aggregate_32_vs_1", "rss_32_vs_1", "tokens_lost", "peer_llamacpp_single_tok_s",
                "engine_single_vs_llamacpp", "pipeline_single_vs_llamacpp", "aggregate_32_vs_llamacpp_single"):
        if key in results:
            print(f"| {key} | {results[key]} |")
    print(f"\nwritten to {out / 'latest.json'}")


if __name__ == "__main__":
    main()
