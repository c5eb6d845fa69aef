"""Every 4xx case of PROTOCOL.md: its status and error shape, and no model work (no stored request)."""

import pytest
import requests
from django.utils import timezone

from chat.models import Deployment, RequestLog
from chat.tokens import token_create


@pytest.fixture
def no_new_requests():
    """Asserts that the test stored (and so enqueued) no request."""
    before = RequestLog.objects.count()
    yield
    assert RequestLog.objects.count() == before, "a refused request reached the queue"


def post(stack, token=None, deployment="default", **kwargs):
    headers = kwargs.pop("headers", {})
    if token is not None:
        headers["Authorization"] = token
    return requests.post(stack.predict_url(deployment), headers=headers, timeout=60, **kwargs)


def assert_error(response, status, type_, param=None):
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["type"] == type_
    assert error["message"]
    if param is not None:
        assert error["param"] == param
    return error


def test_missing_token_is_401(stack, no_new_requests):
    assert_error(post(stack, json={"prompt": "hi"}), 401, "authentication_error")


def test_wrong_token_is_401(stack, no_new_requests):
    assert_error(post(stack, "llm-not-a-token", json={"prompt": "hi"}), 401, "authentication_error")
    assert_error(post(stack, "Bearer llm-not-a-token", json={"prompt": "hi"}), 401, "authentication_error")


def test_wrong_token_is_refused_even_for_an_unknown_deployment(stack, no_new_requests):
    assert_error(post(stack, "nope", deployment="secret-model", json={"prompt": "hi"}), 401, "authentication_error")


def test_revoked_token_is_401(stack, user, no_new_requests):
    token, raw = token_create(user=user)
    token.revoke()
    assert_error(post(stack, raw, json={"prompt": "hi"}), 401, "authentication_error")


def test_token_of_an_inactive_user_is_401(stack, db_user_factory, no_new_requests):
    _, raw = token_create(user=db_user_factory(is_active=False))
    assert_error(post(stack, raw, json={"prompt": "hi"}), 401, "authentication_error")


def test_token_limited_to_another_deployment_is_403(stack, user, no_new_requests):
    other = Deployment.objects.create(name=f"other-{timezone.now().timestamp():.0f}", model_source="x/y")
    _, raw = token_create(user=user, deployments=[other])
    assert_error(post(stack, raw, json={"prompt": "hi"}), 403, "permission_error")


def test_unknown_deployment_is_404_and_named(stack, token, no_new_requests):
    error = assert_error(post(stack, token, deployment="llm_demo404", json={"prompt": "hi"}), 404, "not_found_error")
    assert "llm_demo404" in error["message"]


def test_declared_json_that_is_not_json_is_400(stack, token, no_new_requests):
    response = post(stack, token, data=b'{"prompt": "hi"', headers={"Content-Type": "application/json"})
    assert_error(response, 400, "invalid_request_error", "body")


@pytest.mark.parametrize(
    "field, value",
    [
        ("prompt", 42),
        ("temperature", "hot"),
        ("temperature", 2.5),
        ("temperature", -0.1),
        ("top_k", -1),
        ("top_k", 1.5),
        ("top_p", 0),
        ("top_p", 1.2),
        ("max_new_tokens", 0),
        ("max_new_tokens", "many"),
        ("do_sample", "yes"),
        ("use_stream_chat", 1),
        ("history", "none"),
        ("history", [["only one"]]),
        ("history", [[1, 2]]),
        ("system_prompt", ["a"]),
    ],
)
def test_bad_field_is_400_naming_the_field(stack, token, no_new_requests, field, value):
    error = assert_error(post(stack, token, json={"prompt": "hi", field: value}), 400, "invalid_request_error", field)
    assert field in error["message"]


def test_out_of_range_message_names_the_limit(stack, token, no_new_requests):
    error = assert_error(post(stack, token, json={"prompt": "hi", "temperature": 3}), 400, "invalid_request_error", "temperature")
    assert "2" in error["message"]


def test_body_that_is_not_utf8_is_400(stack, token, no_new_requests):
    assert_error(post(stack, token, data=b"caf\xe9 \xff"), 400, "invalid_request_error", "body")


def test_unknown_knowledge_base_is_400(stack, token, no_new_requests):
    body = {"prompt": "What does the manual say?", "langchain": True, "knowledge_base": "no-such-kb"}
    error = assert_error(post(stack, token, json=body), 400, "invalid_request_error", "knowledge_base")
    assert "no-such-kb" in error["message"]


def test_prompt_longer_than_the_context_is_400_with_both_lengths(stack, token, no_new_requests):
    context = Deployment.objects.get(name="default").effective_context_length
    prompt = "word " * (context + 100)
    history = [["hello " * 50, "hi " * 50]]
    error = assert_error(post(stack, token, json={"prompt": prompt, "history": history}), 400, "invalid_request_error", "prompt")
    numbers = [int(w) for w in error["message"].replace(",", " ").split() if w.isdigit()]
    assert context in numbers
    assert any(n > context for n in numbers)


def test_body_over_the_size_limit_is_413(stack, token, no_new_requests, settings):
    big = b"x" * (settings.PREDICT_MAX_BODY_BYTES + 1)
    response = post(stack, token, data=big)
    assert response.status_code == 413
    assert response.json()["error"]["message"]


def test_get_is_refused(stack, token, no_new_requests):
    response = requests.get(stack.predict_url(), headers={"Authorization": token}, timeout=30)
    assert response.status_code == 405
