"""A request whose logits are not numbers (NaN weights, a float16 overflow) ends with a clear error,
at its first token or mid-stream, and the requests beside it are whole: in the transformers engine
(slots, the static path one step ahead, the padded cache) and in the llama.cpp engine's choice of
tokens. The llama.cpp engine itself is tested in test_llamacpp_engine.py, on the one engine that
module shares (a second one would hold its contexts' memory for the rest of the suite)."""

import dataclasses

import numpy as np
import pytest
import torch

from llmsite.contract import SamplingParams
from tests.workers.test_slots import _greedy_without_cache, _tiny
from workers.engines.batch_sampling import choose_rows, start_sampling
from workers.engines.batching import BatchingScheduler, BatchRequest
from workers.engines.llamacpp.scheduler import LlamaCppScheduler, _greedy
from workers.engines.sampling import TokenPolicy
from workers.engines.scheduling import NOT_A_NUMBER, NOT_A_NUMBER_ERROR

NAN, INF = float("nan"), float("inf")
BROKEN = ("error", NOT_A_NUMBER_ERROR)
PROBE = {(7 * i + 3) % 300 for i in range(1, 12)}  # the tokens of the engine's load-time check (batching.py)


def test_choose_rows_gives_not_a_number_for_rows_with_no_finite_best_and_keeps_the_others():
    torch.manual_seed(0)
    logits = torch.randn(6, 50)
    logits[1, 7] = NAN
    logits[2] = -INF
    logits[3, 9] = INF
    logits[5, 3] = NAN
    greedy = BatchRequest(id="g", prompt_ids=[1], max_new_tokens=4, greedy=True)
    sampled = BatchRequest(id="s", prompt_ids=[1], max_new_tokens=4, greedy=False, temperature=0.9, top_p=0.8, seed=5)
    start_sampling(sampled, "cpu")
    requests = [greedy, greedy, sampled, greedy, sampled, sampled]
    tokens = choose_rows(requests, logits, torch.Generator().manual_seed(1)).tolist()
    assert tokens[1] == tokens[2] == tokens[3] == tokens[5] == NOT_A_NUMBER
    assert tokens[0] == int(logits[0].argmax()) and 0 <= tokens[4] < 50


def test_the_llama_cpp_engines_choice_gives_not_a_number_for_such_rows():
    logits = np.random.default_rng(0).normal(size=(4, 50)).astype(np.float32)
    logits[1, 20] = np.nan
    logits[2] = -np.inf
    assert _greedy(logits) == [int(np.argmax(logits[0])), NOT_A_NUMBER, NOT_A_NUMBER, int(np.argmax(logits[3]))]
    sampled = BatchRequest(id="s", prompt_ids=[1], max_new_tokens=4, greedy=False, temperature=0.9, seed=5)
    for request in (BatchRequest(id="g", prompt_ids=[1], max_new_tokens=4, greedy=True), sampled):
        assert LlamaCppScheduler._sample(None, request, logits[1]) == NOT_A_NUMBER
        assert LlamaCppScheduler._sample(None, request, logits[2]) == NOT_A_NUMBER


MODES = {
    "slots": {},
    "static path, one step ahead": {"LLMSITE_CUDA_GRAPHS": "emulate", "LLMSITE_DECODE_AHEAD": "1"},
    "padded cache": {"LLMSITE_SLOTS": "0"},
}


@pytest.mark.parametrize("mode", list(MODES))
def test_a_request_whose_logits_turn_nan_ends_with_an_error_and_the_others_are_whole(monkeypatch, mode):
    for name, value in MODES[mode].items():
        monkeypatch.setenv(name, value)
    model = _tiny("llama")
    # ten healthy rows beside three broken ones: on the padded cache the broken rows stay in the
    # batch (dead, still decoded) until a quarter of it is dead
    healthy = [[9, 8, 7, 6, 5], [3, 4], [10, 20, 30], [40, 41, 42, 43], [50, 60], [61], [62, 63], [70, 71, 72], [80, 81], [90]]
    middle = [5, 6, 7]
    references = {tuple(p): _greedy_without_cache(model, p, 10) for p in healthy + [middle]}
    # a token the middle request's answer gives after a few tokens, and nobody else meets: its
    # embedding made NaN breaks that request mid-stream (the step after it is fed) and any prompt
    # that holds it at once
    answer = references[tuple(middle)]
    others = {t for p in healthy for t in p + references[tuple(p)]} | PROBE | set(middle + answer[:2])
    poison = next(t for t in answer[2:] if t not in others)
    with torch.no_grad():
        model.model.embed_tokens.weight[poison] = NAN
    scheduler = BatchingScheduler(model, max_batch_size=16)
    try:
        expected_mode = {"slots": "slots", "padded cache": "padded cache"}.get(mode, "slots, static buffers")
        assert scheduler.decode_mode.startswith(expected_mode)
        with_policy = request("policy", [4, poison, 3])
        greedy = SamplingParams(max_new_tokens=10, temperature=0, top_k=0, top_p=1.0, do_sample=False, repetition_penalty=1.3)
        with_policy.policy = TokenPolicy(greedy, with_policy.prompt_ids, 300, {})
        broken = [request("first", [4, poison, 3]), with_policy, request("middle", middle)]
        results = run(scheduler, broken + [_seeded(healthy[0])] + [request(f"healthy {i}", p) for i, p in enumerate(healthy[1:])])
        assert results[0] == ([], BROKEN) and results[1] == ([], BROKEN)
        assert results[2] == (answer[: answer.index(poison) + 1], BROKEN)  # the tokens before the failure were sent
        assert [tokens for tokens, end in results[4:]] == [references[tuple(p)] for p in healthy[1:]]
        assert all(end == ("done", "length") for _, end in results[3:])
        # the engine serves on, in the rows the broken requests left, with the same answers
        assert run(scheduler, [request("again", healthy[0])])[0][0] == references[tuple(healthy[0])]
        assert run(scheduler, [_seeded(healthy[0])])[0] == results[3]
    finally:
        scheduler.stop()


def request(name: str, prompt: list[int]) -> BatchRequest:
    return BatchRequest(id=name, prompt_ids=prompt, max_new_tokens=10, greedy=True)


def _seeded(prompt: list[int]) -> BatchRequest:
    return dataclasses.replace(request("seeded", prompt), greedy=False, temperature=0.9, top_p=0.9, seed=11)


def run(scheduler, requests: list[BatchRequest]) -> list[tuple[list[int], tuple]]:
    """Each request's tokens and how it ended, submitted together."""
    for sent in requests:
        scheduler.submit(sent)
    results = []
    for sent in requests:
        tokens = []
        while (item := sent.out.get(timeout=60))[0] == "token":
            tokens.append(item[1])
        results.append((tokens, item))
    return results


def nan_after(logits: np.ndarray, calls: list, steps: int) -> np.ndarray:
    """The logits, NaN from call `steps` on."""
    calls.append(1)
    return np.full_like(logits, np.nan) if len(calls) > steps else logits
