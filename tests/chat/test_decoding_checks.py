"""The decoding fields checked in the web tier before anything is queued (issue 21): a field an
engine cannot honour is a 400 naming the field and the engine; the chat page sends repetition_penalty."""

import pytest

from chat import conversations
from chat.decoding import check_decoding
from chat.models import Deployment
from chat.protocols import openai as wire
from llmsite import engine_features
from llmsite.errors import InvalidRequest


def test_a_field_the_engine_cannot_honour_is_400_naming_the_field_and_the_engine(monkeypatch):
    deployment = Deployment.objects.get(name="default")
    values = wire.ChatCompletionRequest(
        model="default", messages=[{"role": "user", "content": "Hi"}], response_format={"type": "json_object"}, logprobs=True
    ).decoding()
    check_decoding(deployment=deployment, values=values)  # every engine honours every field today
    monkeypatch.setitem(engine_features.ENGINE_FEATURES, deployment.engine, frozenset({"logprobs", "top_logprobs"}))
    with pytest.raises(InvalidRequest) as refused:
        check_decoding(deployment=deployment, values=values)
    assert refused.value.param == "response_format" and deployment.engine in refused.value.message
    check_decoding(deployment=deployment, values={"logprobs": True, "grammar": ""})  # unused fields need nothing


def test_request_fields_map_onto_the_contracts_sampling_params():
    chat = wire.ChatCompletionRequest(
        model="m", messages=[{"role": "user", "content": "Hi"}], frequency_penalty=0.5, logit_bias={"7": -100}, n=2,
        logprobs=True, top_logprobs=3, extra_body_is_ignored=1,
    )
    values = chat.decoding()
    assert values == {"frequency_penalty": 0.5, "logit_bias": {"7": -100.0}, "n": 2, "logprobs": True, "top_logprobs": 3}
    assert wire.CompletionRequest(model="m", prompt="Hi", logprobs=0).decoding() == {"logprobs": True, "top_logprobs": 0}
    assert not wire.CompletionRequest(model="m", prompt="Hi").uses_decoding()
    text = wire.ChatCompletionRequest(model="m", messages=[{"role": "user", "content": "Hi"}], response_format={"type": "text"})
    assert text.decoding() == {}


def test_the_chat_page_sends_repetition_penalty_as_a_sampling_field():
    fields = conversations.chat_fields({"prompt": "Hi", "repetition_penalty": 1.2})
    assert fields.repetition_penalty == 1.2
    assert conversations.deployment_defaults(Deployment.objects.get(name="default"))["repetition_penalty"] == 1.0
    with pytest.raises(InvalidRequest) as refused:
        conversations.chat_fields({"prompt": "Hi", "repetition_penalty": -1})
    assert refused.value.param == "repetition_penalty"
