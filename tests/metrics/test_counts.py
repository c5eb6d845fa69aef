"""After real requests (streamed, stopped, refused for a bad field, refused by a rate limit), the web
tier's and the worker's /metrics parse, and every counter and histogram count grew by exactly what
was sent. The suite shares its worker, so each test compares before and after, on a deployment of
its own."""

import json

import requests

from chat.models import RequestLog
from chat.tokens import token_create
from tests.metrics.conftest import scrape, value, wait_rows_ended

LONG_PROMPT = "Count from 1 to 300, writing each number on its own line."
HISTOGRAMS = ("time_to_first_token_seconds", "e2e_request_latency_seconds", "request_queue_time_seconds", "inter_token_latency_seconds")
COUNTERS = ("prompt_tokens_total", "generation_tokens_total", "prefix_cache_hits_total")


def rate_limited_token(user) -> str:
    token, raw = token_create(user=user)
    token.requests_per_minute = 1
    token.save()
    return raw


def stream(base_url: str, token: str, name: str, prompt: str, max_new_tokens: int):
    response = requests.post(
        f"{base_url}/api/predict/{name}",
        headers={"Authorization": token},
        json={"prompt": prompt, "use_stream_chat": True, "max_new_tokens": max_new_tokens, "temperature": 0},
        stream=True,
        timeout=300,
    )
    assert response.status_code == 200, response.text
    return response, response.iter_lines(chunk_size=64, delimiter=b"\0")


def worker_view(samples, name: str) -> dict:
    """What the worker's metrics say about deployment `name`."""
    view = {f"requests/{o}": value(samples, "llmsite:requests_total", deployment=name, outcome=o) for o in ("finished", "stopped", "error", "rejected")}
    view.update({h: value(samples, f"llmsite:{h}_count", deployment=name) for h in HISTOGRAMS})
    view.update({c: value(samples, f"llmsite:{c}", deployment=name) for c in COUNTERS})
    return view


def web_view(samples, name: str) -> dict:
    view = {r: value(samples, "llmsite:requests_total", deployment=name, outcome="rejected", reason=r) for r in ("invalid_request", "rate_limited")}
    view["all"] = value(samples, "llmsite:requests_total", deployment=name)
    return view


def grown(before: dict, after: dict) -> dict:
    return {k: after[k] - before[k] for k in after}


def test_counters_and_histograms_grow_by_exactly_the_requests_sent(stack, user, token, deployment):
    web_url, name = f"{stack.url}/metrics", deployment.name
    web_before, worker_before = web_view(scrape(web_url), name), worker_view(scrape(stack.worker_metrics_url), name)
    limited = rate_limited_token(user)

    # Streamed to its end (the limited token's one request this minute).
    response, pieces = stream(stack.url, limited, name, "What is the capital of France?", 8)
    assert [json.loads(p) for p in pieces if p][-1]["response"]
    # Refused by the rate limit: the same token again.
    refused = requests.post(f"{stack.url}/api/predict/{name}", headers={"Authorization": limited}, json={"prompt": "Hi"}, timeout=60)
    assert refused.status_code == 429, refused.text
    # Refused for a bad field.
    invalid = requests.post(f"{stack.url}/api/predict/{name}", headers={"Authorization": token}, json={"prompt": "Hi", "temperature": 5}, timeout=60)
    assert invalid.status_code == 400 and invalid.json()["error"]["param"] == "temperature", invalid.text
    # Stopped: the client leaves once the first piece arrived.
    # (a greedy answer that loops until max_new_tokens, so it outlasts the disconnect grace, RESUME_GRACE_SECONDS)
    response, pieces = stream(stack.url, token, name, "Write a very long story about a lighthouse keeper", 1000)
    assert next(p for p in pieces if p)
    response.close()
    wait_rows_ended(deployment)

    rows = list(RequestLog.objects.filter(deployment=deployment))
    assert sorted(r.status for r in rows) == ["cancelled", "ok"]
    web, worker = grown(web_before, web_view(scrape(web_url), name)), grown(worker_before, worker_view(scrape(stack.worker_metrics_url), name))
    assert web == {"invalid_request": 1, "rate_limited": 1, "all": 2}
    assert worker == {
        "requests/finished": 1,
        "requests/stopped": 1,
        "requests/error": 0,
        "requests/rejected": 0,
        "time_to_first_token_seconds": 2,
        "e2e_request_latency_seconds": 2,
        "request_queue_time_seconds": 2,
        "inter_token_latency_seconds": sum(r.completion_tokens - 1 for r in rows),
        "prompt_tokens_total": sum(r.prompt_tokens for r in rows),
        "generation_tokens_total": sum(r.completion_tokens for r in rows),
        "prefix_cache_hits_total": sum(r.cached_tokens for r in rows),
    }
    assert all(r.completion_tokens >= 2 for r in rows)  # so each had gaps between tokens to count


def test_the_worker_reports_its_models_load_state_and_engine(stack, deployment):
    samples = scrape(stack.worker_metrics_url)
    assert value(samples, "llmsite:model_load_state", deployment="default", state="ready") == 1
    assert value(samples, "llmsite:model_load_state", deployment="default", state="failed") == 0
    assert value(samples, "llmsite:engine_max_batch_size", deployment="default") >= 1
    kv = [s.value for s in samples if s.name == "llmsite:kv_cache_usage_perc" and s.labels["deployment"] == "default"]
    assert len(kv) == 1 and 0 <= kv[0] <= 1  # the default's llama.cpp engine has a KV cache of fixed size
    assert any(s.name == "process_resident_memory_bytes" for s in samples)  # the process's own, too
    web = scrape(f"{stack.url}/metrics")
    assert value(web, "llmsite:requests_in_flight", deployment=deployment.name) == 0  # listed, with nothing in flight
