"""Contract v3's decoding fields (penalties, logit_bias, logprobs, seed, grammar) in the llama.cpp
and transformers engines, called in-process: workers/engines/sampling.py chooses the tokens."""

import dataclasses
import json
import re
import threading

import pytest

from chat.models import Deployment
from chat.prompting import render_prompt
from llmsite.contract import SamplingParams
from workers.engines.base import GenerationResult
from workers.engines.sampling import PolicyError, grammar_tokenizer

llguidance = pytest.importorskip("llguidance")
jsonschema_rs = pytest.importorskip("jsonschema_rs")

STORY = "Write a very long story about a lighthouse keeper"
# Bounded strings and arrays: a valid answer fits in 400 tokens, so a "length" finish is a failure.
SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 20},
        "kind": {"type": "string", "enum": ["cat", "dog", "bird"]},
        "owner": {
            "type": "object",
            "properties": {"first": {"type": "string", "maxLength": 16}, "age": {"type": "integer", "minimum": 0, "maximum": 120}},
            "required": ["first", "age"],
            "additionalProperties": False,
        },
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 12}, "maxItems": 3},
    },
    "required": ["name", "kind", "owner", "tags"],
    "additionalProperties": False,
}
PETS = [
    "Describe a pet as JSON.", "Give me a dog.", "A cat named Tom, please.", "Invent a bird.",
    "My neighbour's pet, as JSON.", "A pet for a child.", "The oldest pet you know.",
    "A pet with three tags.", "Who owns the parrot?", "Describe any animal.",
]


@pytest.fixture(scope="module", params=["llamacpp", "transformers"])
def engine(request, django_db_setup, django_db_blocker):
    with django_db_blocker.unblock():
        deployment = Deployment.objects.get(name="default")
    if request.param == "llamacpp":
        pytest.importorskip("llama_cpp")
        from workers.engines.llamacpp.engine import LlamaCppEngine as kind
    else:
        from workers.engines.transformers_engine import TransformersEngine as kind
    engine = kind(deployment)
    yield engine
    engine.scheduler.stop()


def params(n=24, **fields):
    base = SamplingParams(max_new_tokens=n, temperature=0, top_k=0, top_p=1.0, do_sample=False)
    return dataclasses.replace(base, **fields)


def sampled(n, seed, **fields):
    return params(n, temperature=1.0, do_sample=True, seed=seed, **fields)


def ask(engine, question, sampling):
    prompt = render_prompt(engine.tokenizer, [{"role": "user", "content": question}])
    result = GenerationResult()
    text = "".join(engine.stream(prompt, sampling, result, lambda: False))
    return text, result


def ask_all(engine, questions, samplings):
    answers = [None] * len(questions)

    def run(i):
        answers[i] = ask(engine, questions[i], samplings[i])

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(questions))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(600)
    return answers


def repeated_sentences(text):
    """How many sentences of `text` are a repeat of an earlier one."""
    sentences = [s.strip().lower() for s in re.split(r"[.!?\n]+", text) if len(s.strip()) > 3]
    return len(sentences) - len(set(sentences))


def json_grammar(schema):
    return llguidance.LLMatcher.grammar_from_json_schema(schema, defaults={"whitespace_flexible": False})


def test_the_greedy_story_loops_and_each_penalty_makes_it_repeat_less(engine):
    answers = ask_all(engine, [STORY] * 4, [
        params(400),
        params(400, frequency_penalty=1.0),
        params(400, presence_penalty=1.5),
        params(400, repetition_penalty=1.3),
    ])
    plain = repeated_sentences(answers[0][0])
    assert plain >= 3, f"the plain greedy story no longer loops: {answers[0][0]!r}"
    for text, _ in answers[1:]:
        assert repeated_sentences(text) < plain, text


def test_logprobs_are_raw_sorted_and_greedy_picks_the_most_likely(engine):
    text, result = ask(engine, "What is the capital of France?", params(12, logprobs=True, top_logprobs=5))
    entries = result.logprobs
    assert text and len(entries) == result.completion_tokens - (result.finish_reason == "stop")
    assert "".join(e["token"] for e in entries) == text
    for entry in entries:
        tops = [t["logprob"] for t in entry["top_logprobs"]]
        assert len(tops) == 5 and tops == sorted(tops, reverse=True)
        assert all(lp <= 0 for lp in [entry["logprob"], *tops])
        assert entry["token"] == entry["top_logprobs"][0]["token"] and entry["logprob"] == tops[0]
        assert bytes(entry["bytes"]).decode() == entry["token"]


def test_a_banned_token_never_appears(engine):
    _, plain = ask(engine, "What is the capital of France?", params(12, logprobs=True))
    first = engine.tokenizer.convert_tokens_to_ids(engine.tokenizer.tokenize(plain.logprobs[0]["token"]))[0]
    _, banned = ask(engine, "What is the capital of France?", params(12, logprobs=True, logit_bias={str(first): -100}))
    assert plain.logprobs[0]["bytes"] not in [e["bytes"] for e in banned.logprobs]


def test_the_same_seed_gives_the_same_answer_with_penalties_and_a_grammar(engine):
    fields = {"frequency_penalty": 0.5, "repetition_penalty": 1.1, "grammar": json_grammar(SCHEMA)}
    answers = ask_all(engine, [PETS[0]] * 3, [sampled(120, 7, **fields), sampled(120, 7, **fields), sampled(120, 8, **fields)])
    assert answers[0][0] == answers[1][0]
    assert answers[0][0] != answers[2][0]


def test_sampled_answers_under_a_json_schema_grammar_are_always_valid(engine):
    validator = jsonschema_rs.validator_for(SCHEMA)
    grammar = json_grammar(SCHEMA)
    answers = ask_all(engine, PETS, [sampled(400, seed, grammar=grammar) for seed in range(len(PETS))])
    for text, result in answers:
        assert result.finish_reason == "stop", text
        assert validator.is_valid(json.loads(text)), text


def test_a_grammar_that_does_not_build_and_a_token_out_of_the_vocabulary_are_refused(engine):
    with pytest.raises(PolicyError) as refused:
        ask(engine, "Hi", params(4, grammar='{"grammars": [{"lark_grammar": "start: nope"}]}'))
    assert refused.value.param == "response_format"
    with pytest.raises(PolicyError) as refused:
        ask(engine, "Hi", params(4, logit_bias={str(engine.vocab_width()): 5}))
    assert refused.value.param == "logit_bias"
    assert grammar_tokenizer(engine).vocab_size <= engine.vocab_width()
