"""Continuous batching in the transformers engine, called in-process (no stack needed)."""

import threading
import time

import pytest

from llmsite.contract import SamplingParams
from chat.models import Deployment
from chat.prompting import render_prompt
from workers.engines.base import GenerationResult

QUESTIONS = [
    f"What is the capital of {c}?"
    for c in ["France", "Egypt", "Canada", "Russia", "Germany", "Japan", "China", "India",
              "Brazil", "Kenya", "Peru", "Chile", "Cuba", "Greece", "Norway", "Poland"]
]
CAPITALS = {"France": "Paris", "Egypt": "Cairo", "Canada": "Ottawa", "Russia": "Moscow", "Germany": "Berlin"}


@pytest.fixture(scope="module")
def engine(django_db_setup, django_db_blocker):
    from workers.engines.transformers_engine import TransformersEngine

    with django_db_blocker.unblock():
        deployment = Deployment.objects.get(name="default")
    return TransformersEngine(deployment)


def greedy(n=16):
    return SamplingParams(max_new_tokens=n, temperature=0, top_k=0, top_p=1.0, do_sample=False)


def ask(engine, question, params, cancelled=lambda: False):
    prompt = render_prompt(engine.tokenizer, [{"role": "user", "content": question}])
    result = GenerationResult()
    text = "".join(engine.stream(prompt, params, result, cancelled))
    return text, result


def ask_all(engine, questions, params):
    """Ask concurrently; `params` is one SamplingParams for all, or a list of one per question."""
    answers = [None] * len(questions)
    each = params if isinstance(params, list) else [params] * len(questions)

    def run(i):
        answers[i] = ask(engine, questions[i], each[i])

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(questions))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(600)
    return answers


def test_sixteen_batched_greedy_answers_equal_their_single_stream_answers(engine):
    single = [ask(engine, q, greedy())[0] for q in QUESTIONS]
    batched = ask_all(engine, QUESTIONS, greedy())
    assert [text for text, _ in batched] == single
    assert all(result.completion_tokens == 16 or result.finish_reason == "stop" for _, result in batched)


def test_concurrent_streams_each_answer_their_own_question(engine):
    questions = [f"What is the capital of {c}?" for c in CAPITALS]
    answers = ask_all(engine, questions, greedy(32))
    for (country, city), (text, _) in zip(CAPITALS.items(), answers):
        assert city in text, (country, text)
        assert not any(other in text for other in CAPITALS.values() if other != city)


def test_an_aborted_request_frees_its_slot_and_the_others_finish(engine):
    stop = threading.Event()
    outcome = {}

    def long_story():
        outcome["story"] = ask(engine, "Tell me a very long story about a dragon.", greedy(400), stop.is_set)

    story = threading.Thread(target=long_story)
    story.start()
    time.sleep(1.0)
    others = ask_all(engine, [f"What is the capital of {c}?" for c in list(CAPITALS)[:3]], greedy(32))
    stop.set()
    story.join(60)
    text, result = outcome["story"]
    assert result.finish_reason == "cancelled"
    assert 0 < result.completion_tokens < 400
    for city, (answer, _) in zip(CAPITALS.values(), others):
        assert city in answer
    deadline = time.monotonic() + 10
    while engine.scheduler.running:
        assert time.monotonic() < deadline, "the aborted request still holds its slot"
        time.sleep(0.05)


def test_sampling_with_a_seed_is_reproducible_inside_a_batch(engine):
    params = SamplingParams(max_new_tokens=12, temperature=0.9, top_k=30, top_p=0.9, do_sample=True, seed=1234)
    first = ask(engine, "Write a short poem about rain.", params)[0]
    batched = ask_all(engine, ["Write a short poem about rain."] + QUESTIONS[:3], params)
    assert batched[0][0] == first


def test_greedy_and_sampled_requests_in_one_batch_each_keep_their_own_settings(engine):
    # Greedy rows take one argmax over the whole batch; sampled rows each their own sampler.
    sampled = SamplingParams(max_new_tokens=12, temperature=0.9, top_k=30, top_p=0.9, do_sample=True, seed=99)
    questions = ["Write a short poem about rain."] + QUESTIONS[:4]
    params = [sampled] + [greedy(12)] * 4
    single = [ask(engine, q, p)[0] for q, p in zip(questions, params)]
    batched = ask_all(engine, questions, params)
    assert [text for text, _ in batched] == single
    assert batched[0][0] != ask(engine, questions[0], greedy(12))[0], "the sampled row was answered greedily"


WORDS = ["apple", "banana", "cherry", "dolphin", "eagle", "falcon", "guitar", "hammer",
         "tiger", "jaguar", "kettle", "rocket", "mango", "violin", "orange", "pirate"]


def test_sixteen_concurrent_streams_with_different_questions_each_answer_their_own(engine):
    answers = ask_all(engine, [f"Repeat this word exactly once: {w}" for w in WORDS], greedy(16))
    for word, (text, _) in zip(WORDS, answers):
        assert word in text.lower(), (word, text)
        assert not [other for other in WORDS if other != word and other in text.lower()], (word, text)


def test_aborting_one_of_sixteen_streams_leaves_the_other_fifteen_whole(engine):
    questions = [f"Repeat this word exactly once: {w}" for w in WORDS[:15]]
    expected = [ask(engine, q, greedy(16))[0] for q in questions]
    stop = threading.Event()
    outcome = {}

    def doomed():
        outcome["doomed"] = ask(engine, "Tell me a very long story about a dragon.", greedy(400), stop.is_set)

    victim = threading.Thread(target=doomed)
    victim.start()
    timer = threading.Timer(1.0, stop.set)  # aborted while the fifteen are in the batch with it
    timer.start()
    answers = ask_all(engine, questions, greedy(16))
    victim.join(60)
    assert outcome["doomed"][1].finish_reason == "cancelled"
    assert [text for text, _ in answers] == expected
