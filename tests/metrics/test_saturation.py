"""Requests waiting for their turn while a deployment is saturated show in the web tier's
`llmsite:requests_in_flight{status="queued"}` (they wait in the deployment's line in Redis, not in
a worker: llmsite/admission.py), the engine's batch is full and nothing waits inside it; all
return to 0 after."""

import json

import pytest
import requests
import websocket

from tests.metrics.conftest import copy_of_default, scrape, value, wait_rows_ended, wait_until

LONG_PROMPT = "Count from 1 to 300, writing each number on its own line."


@pytest.fixture
def one_at_a_time(stack):
    """An engine of its own (another precision: the llama.cpp engine ignores it) that runs one
    request at a time, with a small KV cache (it stays loaded for the rest of the suite)."""
    return copy_of_default("saturated", max_batch_size=1, precision="bf16", context_length=512)


def test_requests_waiting_rises_while_a_deployment_is_saturated_and_returns_to_zero(stack, token, one_at_a_time):
    name = one_at_a_time.name
    warm = requests.post(stack.predict_url(name), headers={"Authorization": token}, json={"prompt": "Hi", "max_new_tokens": 2}, timeout=600)
    assert warm.status_code == 200, warm.text  # its engine is loaded now
    samples = scrape(stack.worker_metrics_url)
    assert value(samples, "llmsite:model_load_state", deployment=name, state="ready") == 1
    assert value(samples, "llmsite:engine_max_batch_size", deployment=name) == 1
    assert value(samples, "llmsite:num_requests_waiting", deployment=name) == 0

    sockets = []
    try:
        for _ in range(3):
            ws = websocket.create_connection(stack.predict_ws_url(name), header=[f"Authorization: {token}"], timeout=60)
            ws.send(json.dumps({"prompt": LONG_PROMPT, "max_new_tokens": 300, "temperature": 0}))
            sockets.append(ws)

        def saturated():
            # Both at once: the first one's row is still queued for a moment after the worker took it.
            web = scrape(f"{stack.url}/metrics")
            state = {status: value(web, "llmsite:requests_in_flight", deployment=name, status=status) for status in ("queued", "running")}
            return state == {"queued": 2, "running": 1}

        wait_until(saturated, "two requests waited behind the running one (only one taken)")

        def full():
            samples = scrape(stack.worker_metrics_url)
            return samples if value(samples, "llmsite:num_requests_running", deployment=name) == 1 else None

        samples = wait_until(full, "its batch is full (the engine took the claimed request in)")
        assert value(samples, "llmsite:num_requests_waiting", deployment=name) == 0  # the worker holds none waiting
    finally:
        for ws in sockets:
            ws.close()  # the clients leave: every request is cancelled, waiting or running

    def drained():
        samples = scrape(stack.worker_metrics_url)
        return value(samples, "llmsite:num_requests_waiting", deployment=name) == 0 and value(samples, "llmsite:num_requests_running", deployment=name) == 0

    wait_until(drained, "the engine was empty again")
    wait_rows_ended(one_at_a_time)
    assert value(scrape(f"{stack.url}/metrics"), "llmsite:requests_in_flight", deployment=name) == 0
