"""The sampling fields on /v1 (issue 21): penalties, logprobs, n, seed, logit_bias, through the
official client on the default model; bad values are 400s naming the field, refused before
anything is stored or queued."""

import re

import pytest
import requests

from chat.models import RequestLog

STORY = [{"role": "user", "content": "Write a very long story about a lighthouse keeper"}]


def repeats(text: str, size: int = 6) -> int:
    """How many runs of `size` words repeat one said before (the default model, greedy on STORY,
    loops: "he had been a sailor for many years too, and he had been ... for many years too")."""
    words = re.findall(r"[a-z']+", text.lower())
    seen, count = set(), 0
    for i in range(len(words) - size + 1):
        run = tuple(words[i : i + size])
        count += run in seen
        seen.add(run)
    return count


def story(client, **fields) -> str:
    completion = client.chat.completions.create(model="default", messages=STORY, temperature=0, max_tokens=300, **fields)
    return completion.choices[0].message.content


def test_penalties_reduce_the_repeated_sentences_of_a_looping_greedy_answer(client):
    looping = repeats(story(client))
    assert looping >= 10, "the default model no longer loops here: pick another prompt"
    for penalty in ({"frequency_penalty": 1.0}, {"presence_penalty": 1.5}, {"extra_body": {"repetition_penalty": 1.3}}):
        assert repeats(story(client, **penalty)) < looping / 2, penalty


def test_chat_logprobs_are_raw_sorted_and_a_greedy_token_is_the_most_likely(client):
    completion = client.chat.completions.create(
        model="default",
        messages=[{"role": "user", "content": "What is the capital of France?"}],
        temperature=0,
        max_tokens=12,
        logprobs=True,
        top_logprobs=5,
    )
    content = completion.choices[0].logprobs.content
    assert content and "".join(e.token for e in content) == completion.choices[0].message.content
    for entry in content:
        assert entry.logprob <= 0 and len(entry.top_logprobs) == 5
        top = [t.logprob for t in entry.top_logprobs]
        assert top == sorted(top, reverse=True) and all(lp <= 0 for lp in top)
        assert entry.logprob >= top[0] - 1e-5, f"greedy chose {entry.token!r}, not the most likely {entry.top_logprobs[0].token!r}"


def test_completion_logprobs_take_the_legacy_shape(client):
    completion = client.completions.create(model="default", prompt="Count to five.", temperature=0, max_tokens=8, logprobs=3)
    logprobs = completion.choices[0].logprobs
    assert len(logprobs.tokens) == len(logprobs.token_logprobs) == len(logprobs.text_offset) == len(logprobs.top_logprobs)
    assert all(lp <= 0 for lp in logprobs.token_logprobs) and all(len(top) <= 3 for top in logprobs.top_logprobs)
    assert logprobs.text_offset[0] == 0 and "".join(logprobs.tokens) == completion.choices[0].text


def test_n_gives_that_many_choices_streamed_or_not(client):
    fields = {"model": "default", "messages": [{"role": "user", "content": "Name an animal."}], "temperature": 1.0, "max_tokens": 16, "seed": 5}
    whole = client.chat.completions.create(n=3, **fields)
    assert [c.index for c in whole.choices] == [0, 1, 2]
    assert all(c.finish_reason in ("stop", "length") and c.message.content for c in whole.choices)
    texts = {}
    for chunk in client.chat.completions.create(n=3, stream=True, **fields):
        for choice in chunk.choices:
            texts[choice.index] = texts.get(choice.index, "") + (choice.delta.content or "")
    assert texts == {c.index: c.message.content for c in whole.choices}  # the same seed, the same answers


def test_the_same_seed_gives_the_same_answer(client):
    def ask():
        return client.chat.completions.create(
            model="default", messages=[{"role": "user", "content": "Write a poem about rain."}], temperature=1.0, max_tokens=24, seed=42
        ).choices[0].message.content

    assert ask() == ask()


@pytest.mark.parametrize(
    "field, value",
    [
        ("n", 9),
        ("n", 0),
        ("frequency_penalty", 2.5),
        ("presence_penalty", -3),
        ("repetition_penalty", 0),
        ("top_logprobs", 21),
        ("logit_bias", {"abc": 1}),
        ("logit_bias", {"5": 101}),
        ("logit_bias", {"999999999": 1}),
    ],
)
def test_a_bad_chat_field_is_400_naming_it_and_nothing_is_queued(stack, token, user, field, value):
    body = {"model": "default", "messages": [{"role": "user", "content": "Hi"}], "logprobs": True, field: value}
    response = requests.post(f"{stack.url}/v1/chat/completions", headers={"Authorization": f"Bearer {token}"}, json=body, timeout=60)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error" and error["param"] == field and field in error["message"], error
    assert not RequestLog.objects.filter(user=user).exists()


@pytest.mark.parametrize("path, body, field", [
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "Hi"}], "top_logprobs": 2}, "top_logprobs"),
    ("/v1/completions", {"prompt": "Hi", "logprobs": 6}, "logprobs"),
    ("/v1/completions", {"prompt": "Hi", "n": 9}, "n"),
])
def test_logprobs_out_of_range_is_400_naming_the_field(stack, token, user, path, body, field):
    response = requests.post(f"{stack.url}{path}", headers={"Authorization": f"Bearer {token}"}, json={"model": "default", **body}, timeout=60)
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == field, response.text
    assert not RequestLog.objects.filter(user=user).exists()


def test_the_schema_has_the_new_fields(stack):
    schemas = requests.get(f"{stack.url}/api/schema/", timeout=30).json()["components"]["schemas"]
    chat = schemas["ChatCompletionRequest"]["properties"]
    for name in ("response_format", "frequency_penalty", "presence_penalty", "repetition_penalty", "logit_bias", "logprobs", "top_logprobs", "n", "seed"):
        assert name in chat, name
    assert {"logprobs", "response_format", "n"} <= set(schemas["CompletionRequest"]["properties"])
    assert "repetition_penalty" in schemas["PredictFields"]["properties"]
    assert {"ChatLogprobs", "CompletionLogprobs", "ResponseFormatJsonSchema"} <= set(schemas)


def test_predict_takes_repetition_penalty_and_refuses_a_bad_one(stack, token, user):
    url, headers = stack.predict_url(), {"Authorization": token}
    ok = requests.post(url, headers=headers, json={"prompt": "Hi", "max_new_tokens": 4, "repetition_penalty": 1.3}, timeout=120)
    assert ok.status_code == 200 and set(ok.json()) >= {"response", "history"}, ok.text
    assert RequestLog.objects.get(user=user).params["repetition_penalty"] == 1.3
    bad = requests.post(url, headers=headers, json={"prompt": "Hi", "repetition_penalty": 0}, timeout=60)
    assert bad.status_code == 400 and "repetition_penalty" in bad.text, bad.text
