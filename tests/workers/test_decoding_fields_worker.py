"""Contract v3's decoding fields through the real worker: a GenerationRequest sent to its queue,
its events read from the request's stream (tests/workers/direct.py)."""

import json
import uuid

import pytest

from chat.models import RequestLog
from llmsite import contract
from llmsite.contract import GenerationRequest, SamplingParams
from tests.workers.direct import run_on_worker

llguidance = pytest.importorskip("llguidance")
jsonschema_rs = pytest.importorskip("jsonschema_rs")

SCHEMA = {
    "type": "object",
    "properties": {"city": {"type": "string", "maxLength": 20}, "big": {"type": "boolean"}},
    "required": ["city", "big"],
    "additionalProperties": False,
}


def run(user, sampling: SamplingParams, question="What is the capital of France?") -> tuple[str, list]:
    """One request handed to the worker (as the web tier does); its id and every event of its stream, in order."""
    request = GenerationRequest(
        request_id=str(uuid.uuid4()), deployment="default", messages=[{"role": "user", "content": question}], sampling=sampling
    )
    heard = run_on_worker(user, request)
    return request.request_id, heard


def sampled(**fields):
    return SamplingParams(**{"max_new_tokens": 60, "temperature": 1.0, "top_k": 0, "top_p": 1.0, "do_sample": True, **fields})


def test_two_answers_under_a_grammar_with_logprobs_stream_apart_and_end_in_one_final(stack, user):
    grammar = llguidance.LLMatcher.grammar_from_json_schema(SCHEMA, defaults={"whitespace_flexible": False})
    request_id, heard = run(user, sampled(n=2, seed=11, grammar=grammar, logprobs=True, top_logprobs=2))
    final = heard[-1]
    assert isinstance(final, contract.Final), heard[-1]
    deltas = [e for e in heard if isinstance(e, contract.Delta)]
    assert {d.index for d in deltas} == {0, 1}
    assert [c["index"] for c in final.choices] == [0, 1]
    validator = jsonschema_rs.validator_for(SCHEMA)
    for choice in final.choices:
        mine = [d for d in deltas if d.index == choice["index"]]
        assert "".join(d.text for d in mine) == choice["text"]
        assert choice["finish_reason"] == "stop" and validator.is_valid(json.loads(choice["text"])), choice
        assert [e for d in mine for e in d.logprobs or []] == choice["logprobs"]
        assert "".join(e["token"] for e in choice["logprobs"]) == choice["text"]
        assert all(e["logprob"] <= 0 and len(e["top_logprobs"]) == 2 for e in choice["logprobs"])
    assert (final.text, final.finish_reason, final.logprobs) == (final.choices[0]["text"], "stop", final.choices[0]["logprobs"])
    tokens = sum(len(c["logprobs"]) for c in final.choices)  # a complete grammar ends an answer: no end token
    assert final.usage["completion_tokens"] == tokens
    row = RequestLog.objects.get(id=request_id)
    assert row.response == final.text and row.completion_tokens == tokens


def test_three_answers_with_a_seed_and_a_stop_string_each_cut_and_the_same_again(stack, user):
    sampling = sampled(n=3, seed=5, stop=["."], max_new_tokens=24)
    first, again = run(user, sampling)[1][-1], run(user, sampling)[1][-1]
    one = run(user, sampled(max_new_tokens=1))[1][-1]
    assert len(first.choices) == 3 and first.choices == again.choices
    assert len({c["text"] for c in first.choices}) > 1  # seeds 5, 6, 7: not one answer thrice
    for choice in first.choices:
        assert "." not in choice["text"] and choice["logprobs"] is None
    assert first.logprobs is None and first.usage["prompt_tokens"] == one.usage["prompt_tokens"]  # the prompt counted once
    assert first.usage["completion_tokens"] >= 3


def test_a_grammar_the_worker_cannot_build_is_an_invalid_request_naming_response_format(stack, user):
    _, heard = run(user, sampled(grammar='{"grammars": [{"lark_grammar": "start: nope"}]}'))
    assert isinstance(heard[-1], contract.Error), heard[-1]
    assert (heard[-1].kind, heard[-1].param) == ("invalid_request", "response_format")
