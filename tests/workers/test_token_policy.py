"""workers/engines/sampling.py's token policy on plain arrays (no model): its penalties are
transformers' and OpenAI's, its logprobs are the raw logits', and a plain request has none."""

import dataclasses

import numpy as np
import pytest

from llmsite.contract import SamplingParams
from workers.engines.sampling import TokenPolicy, uses_policy

WIDTH = 50


def params(**fields):
    return dataclasses.replace(SamplingParams(max_new_tokens=8, temperature=0, top_k=0, top_p=1.0, do_sample=False), **fields)


def logits(seed=0):
    return np.random.default_rng(seed).normal(0, 3, WIDTH).astype(np.float32)


def scored(policy, raw):
    """The scores the policy chooses from (its argmax is its greedy choice)."""
    seen = []
    policy.choose(raw, lambda scores: seen.append(scores.copy()) or 0)
    return seen[0]


def test_a_plain_or_seeded_or_n_request_needs_no_policy_and_each_new_field_does():
    assert not uses_policy(params()) and not uses_policy(params(seed=3, n=4, top_logprobs=5, do_sample=True, temperature=0.7))
    for fields in ({"repetition_penalty": 1.1}, {"frequency_penalty": 0.1}, {"presence_penalty": -0.2},
                   {"logit_bias": {"3": 1}}, {"logprobs": True}, {"grammar": "g"}):
        assert uses_policy(params(**fields)), fields


def test_repetition_penalty_is_transformers_processor():
    torch = pytest.importorskip("torch")
    from transformers import RepetitionPenaltyLogitsProcessor

    prompt, answer = [1, 4, 4, 9], [7, 1]
    policy = TokenPolicy(params(repetition_penalty=1.7), prompt, WIDTH, {})
    for token in answer:
        policy._accept(token)
    raw = logits()
    expected = RepetitionPenaltyLogitsProcessor(1.7)(torch.tensor([prompt + answer]), torch.from_numpy(raw.copy()).unsqueeze(0))[0]
    assert np.allclose(scored(policy, raw), expected.numpy())


def test_frequency_and_presence_penalties_are_openais_over_the_answer_only():
    policy = TokenPolicy(params(frequency_penalty=0.5, presence_penalty=0.25), [3, 3, 3], WIDTH, {})
    for token in [5, 5, 8]:
        policy._accept(token)
    raw = logits(1)
    expected = raw.copy()
    expected[5] -= 2 * 0.5 + 0.25
    expected[8] -= 0.5 + 0.25  # token 3 is only in the prompt: not penalised
    assert np.allclose(scored(policy, raw), expected)


def test_logit_bias_adds_and_logprobs_are_the_raw_logits_log_softmax():
    policy = TokenPolicy(params(logit_bias={"2": -100}, logprobs=True, top_logprobs=3, repetition_penalty=2.0), [0], WIDTH, {2: -100.0})
    raw = logits(2)
    raw[2] = 50  # the raw favourite, banned
    token = policy.choose(raw, None)
    assert token != 2
    chosen, logprob, top = policy.entries[0]
    reference = raw.astype(np.float64) - np.log(np.exp(raw.astype(np.float64)).sum())
    assert chosen == token and np.isclose(logprob, reference[token])
    assert [t for t, _ in top] == list(np.argsort(-reference)[:3]) and top[0][0] == 2  # raw: before the bias
