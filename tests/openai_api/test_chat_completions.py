"""The official `openai` client against /v1: models, chat and text completions, errors, stored rows."""

import pytest
import requests
from openai import AuthenticationError, NotFoundError, OpenAI
from django.conf import settings

from chat.models import Deployment, RequestLog
from chat.prompting import count_tokens, edge_tokenizer, render_prompt

MESSAGES = [
    {"role": "system", "content": "You are concise."},
    {"role": "user", "content": "What is the capital of Japan?"},
]


def tokenizer():
    return edge_tokenizer(Deployment.objects.get(name="default").tokenizer_files)


def test_models_list_has_the_deployments_and_the_embedding_model(client):
    ids = [model.id for model in client.models.list()]
    assert "default" in ids
    assert settings.EMBEDDING_MODEL_NAME in ids
    assert client.models.retrieve("default").id == "default"


def test_capital_of_japan_streamed_and_not_with_usage_from_the_tokenizer(client, user):
    answer = client.chat.completions.create(model="default", messages=MESSAGES, temperature=0, max_tokens=32)
    text = answer.choices[0].message.content
    assert "Tokyo" in text
    assert answer.model == "default" and answer.choices[0].finish_reason == "stop"

    tok = tokenizer()
    prompt_tokens = count_tokens(tok, render_prompt(tok, MESSAGES))
    assert answer.usage.prompt_tokens == prompt_tokens
    # The answer's tokens and the end-of-turn token that stopped it.
    assert answer.usage.completion_tokens == len(tok(text, add_special_tokens=False)["input_ids"]) + 1
    assert answer.usage.total_tokens == prompt_tokens + answer.usage.completion_tokens

    chunks = list(
        client.chat.completions.create(
            model="default", messages=MESSAGES, temperature=0, max_tokens=32, stream=True, stream_options={"include_usage": True}
        )
    )
    assert all(chunk.model == "default" for chunk in chunks)
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == text
    assert len([c for c in chunks if c.choices and c.choices[0].delta.content]) > 1, "not streamed"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    usage = chunks[-1].usage
    assert chunks[-1].choices == [] and (usage.prompt_tokens, usage.completion_tokens, usage.total_tokens) == (
        answer.usage.prompt_tokens, answer.usage.completion_tokens, answer.usage.total_tokens
    )
    # asked again: all but its last two prompt tokens come from the engine's saved rows
    assert usage.prompt_tokens_details.cached_tokens == prompt_tokens - 2

    rows = RequestLog.objects.filter(user=user).order_by("queued_at")
    assert [r.protocol for r in rows] == ["openai", "openai"]
    assert all(r.status == RequestLog.Status.OK and r.response == text for r in rows)
    assert rows[0].prompt == "What is the capital of Japan?" and rows[0].system_prompt == "You are concise."
    assert rows[0].prompt_tokens == prompt_tokens and rows[0].completion_tokens == answer.usage.completion_tokens


def test_the_next_turn_of_a_conversation_reports_the_prompt_tokens_it_did_not_compute(client, user, stack, db_user_factory):
    """The llama.cpp engine keeps a finished request's KV rows, prompt and answer: the next turn of
    the conversation gets them back, and its usage says how many of its prompt tokens were not
    computed again (OpenAI's prompt_tokens_details.cached_tokens). Another user asking the same
    gets none of them (KV_CACHE_SCOPE "user")."""
    from chat.tokens import token_create

    messages = [{"role": "system", "content": "You are a museum guide."}, {"role": "user", "content": "Name a famous painting."}]
    first = client.chat.completions.create(model="default", messages=messages, temperature=0, max_tokens=12)
    messages += [{"role": "assistant", "content": first.choices[0].message.content}, {"role": "user", "content": "Who painted it?"}]
    someone_else = db_user_factory()
    other = OpenAI(base_url=f"{stack.url}/v1", api_key=token_create(user=someone_else)[1], max_retries=0, timeout=180)
    theirs = other.chat.completions.create(model="default", messages=messages, temperature=0, max_tokens=12)
    assert theirs.usage.prompt_tokens_details.cached_tokens == 0
    second = client.chat.completions.create(model="default", messages=messages, temperature=0, max_tokens=12)
    cached = second.usage.prompt_tokens_details.cached_tokens
    # the first prompt and its answer (whose last token was never fed back to the model)
    assert cached == first.usage.prompt_tokens + first.usage.completion_tokens - 1, (cached, first.usage)
    assert cached < second.usage.prompt_tokens
    # the request's stored record keeps it too (the admin sums it per deployment, user, day)
    stored = RequestLog.objects.filter(user__in=[user, someone_else]).order_by("queued_at")
    assert [r.cached_tokens for r in stored] == [first.usage.prompt_tokens_details.cached_tokens, 0, cached]


def test_unknown_model_is_not_found(client):
    with pytest.raises(NotFoundError) as caught:
        client.chat.completions.create(model="no-such-model", messages=MESSAGES)
    assert caught.value.body["code"] == "model_not_found" and "no-such-model" in caught.value.body["message"]


def test_bad_key_is_an_authentication_error(stack):
    bad = OpenAI(base_url=f"{stack.url}/v1", api_key="llm-not-a-token", max_retries=0)
    with pytest.raises(AuthenticationError):
        bad.chat.completions.create(model="default", messages=MESSAGES)
    with pytest.raises(AuthenticationError):
        bad.models.list()


def test_stop_sequence_cuts_the_answer_before_it(client):
    full = client.chat.completions.create(model="default", messages=MESSAGES, temperature=0, max_tokens=32)
    text = full.choices[0].message.content
    cut = client.chat.completions.create(model="default", messages=MESSAGES, temperature=0, max_tokens=32, stop=["Tokyo"])
    assert cut.choices[0].message.content == text[: text.index("Tokyo")]
    assert cut.choices[0].finish_reason == "stop"


def test_max_tokens_ends_with_length(client):
    answer = client.chat.completions.create(
        model="default", messages=[{"role": "user", "content": "Write a long story."}], temperature=0, max_completion_tokens=3
    )
    assert answer.usage.completion_tokens == 3 and answer.choices[0].finish_reason == "length"


def test_names_two_system_messages_and_unknown_fields_are_accepted(client, user):
    messages = [
        {"role": "system", "content": "You are concise."},
        {"role": "system", "content": "You answer in English."},
        {"role": "user", "name": "ada", "content": [{"type": "text", "text": "What is the capital of France?"}]},
    ]
    answer = client.chat.completions.create(
        model="default", messages=messages, temperature=0, max_tokens=16, extra_body={"not_a_field": 1}, user="ada"
    )
    assert answer.choices[0].message.content
    row = RequestLog.objects.get(user=user)
    assert row.system_prompt == "You are concise.\nYou answer in English."
    assert row.prompt == "What is the capital of France?"


def test_text_completion(client):
    answer = client.completions.create(model="default", prompt="What is the capital of France?", temperature=0, max_tokens=16)
    assert answer.object == "text_completion" and "Paris" in answer.choices[0].text
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model="default", prompt="What is the capital of France?", temperature=0, max_tokens=16, stream=True
    ) if c.choices)
    assert streamed == answer.choices[0].text


@pytest.mark.parametrize(
    "field, value",
    [("temperature", 3), ("top_p", 1.5), ("max_tokens", 0), ("n", 9), ("messages", []), ("stop", ["a", "b", "c", "d", "e"])],
)
def test_bad_field_is_400_in_openai_shape(stack, token, field, value):
    body = {"model": "default", "messages": MESSAGES, field: value}
    response = requests.post(f"{stack.url}/v1/chat/completions", headers={"Authorization": f"Bearer {token}"}, json=body, timeout=60)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == "invalid_request_error" and error["param"] == field and field in error["message"]


def test_body_that_is_not_json_is_400(stack, token):
    response = requests.post(
        f"{stack.url}/v1/chat/completions", headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"},
        data=b'{"model": ', timeout=60,
    )
    assert response.status_code == 400 and response.json()["error"]["param"] == "body"


def test_knowledge_base_goes_through_retrieval_checks(stack, token):
    body = {"model": "default", "messages": MESSAGES, "knowledge_base": "no-such-kb"}
    response = requests.post(f"{stack.url}/v1/chat/completions", headers={"Authorization": f"Bearer {token}"}, json=body, timeout=60)
    assert response.status_code == 400
    assert response.json()["error"]["param"] == "knowledge_base" and "no-such-kb" in response.json()["error"]["message"]


def test_schema_covers_predict_and_v1_and_has_a_docs_page(stack):
    schema = requests.get(f"{stack.url}/api/schema/", timeout=30).json()
    for path in ("/api/predict/{deployment}", "/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/v1/models"):
        assert path in schema["paths"], path
    predict = schema["paths"]["/api/predict/{deployment}"]["post"]
    assert "temperature" in schema["components"]["schemas"]["PredictFields"]["properties"]
    assert "text/plain" in predict["requestBody"]["content"]
    docs = requests.get(f"{stack.url}/api/docs/", timeout=30)
    assert docs.status_code == 200 and "/api/schema/" in docs.text
