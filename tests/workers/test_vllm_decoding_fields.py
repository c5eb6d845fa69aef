"""The vLLM adapter maps contract v3's decoding fields to vLLM's own (SamplingParams and
StructuredOutputsParams), checked against the stand-in of the vLLM calls it makes."""

import pytest

from tests.workers import fake_vllm
from tests.workers.test_vllm_engine import params
from workers.engines.base import GenerationResult
from workers.engines.sampling import PolicyError
from workers.engines.vllm_engine import structured_outputs

llguidance = pytest.importorskip("llguidance")

SCHEMA = {"type": "object", "properties": {"a": {"type": "string", "maxLength": 5}}, "required": ["a"]}


def sent(engine, sampling):
    result = GenerationResult()
    text = "".join(engine.stream("p", sampling, result, lambda: False))
    return [c[2] for c in fake_vllm.calls if c[0] == "generate"][-1], text, result


def test_penalties_logit_bias_and_logprobs_map_to_vllm(fake_vllm_engine):
    sampling = params(frequency_penalty=0.5, presence_penalty=0.25, repetition_penalty=1.2, logit_bias={"17": -100},
                      logprobs=True, top_logprobs=2)
    vllm_params, text, result = sent(fake_vllm_engine, sampling)
    assert (vllm_params.frequency_penalty, vllm_params.presence_penalty, vllm_params.repetition_penalty) == (0.5, 0.25, 1.2)
    assert vllm_params.logit_bias == {17: -100.0} and vllm_params.logprobs == 2 and vllm_params.structured_outputs is None
    assert len(result.logprobs) == result.completion_tokens == 5
    assert "".join(e["token"] for e in result.logprobs) == text.replace(" ", "")
    for entry in result.logprobs:  # the stand-in's chosen word ranks 2nd
        assert entry["logprob"] == -1.0 and [t["token"] for t in entry["top_logprobs"]] == ["w1", entry["token"]]


def test_a_plain_request_sends_no_new_fields(fake_vllm_engine):
    vllm_params, _, result = sent(fake_vllm_engine, params())
    assert vllm_params.logprobs is None and vllm_params.logit_bias is None and vllm_params.structured_outputs is None
    assert result.logprobs == []


def test_a_json_schema_grammar_goes_to_vllm_as_its_schema_with_llguidance_options(fake_vllm_engine):
    grammar = llguidance.LLMatcher.grammar_from_json_schema(SCHEMA, defaults={"whitespace_flexible": False})
    vllm_params, _, _ = sent(fake_vllm_engine, params(grammar=grammar))
    schema = vllm_params.structured_outputs.json
    assert {k: v for k, v in schema.items() if k != "x-guidance"} == SCHEMA
    assert schema["x-guidance"] == {"whitespace_flexible": False}


def test_a_lark_grammar_goes_as_vllm_grammar_and_anything_else_is_refused():
    assert structured_outputs(llguidance.LLMatcher.grammar_from_lark('start: "yes" | "no"')) == {"grammar": 'start: "yes" | "no"'}
    two = '{"grammars": [{"lark_grammar": "start: a"}, {"lark_grammar": "start: b"}]}'
    with pytest.raises(PolicyError) as refused:
        structured_outputs(two)
    assert refused.value.param == "response_format"
