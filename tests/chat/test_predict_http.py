"""The predict API over HTTP, called exactly as existing clients call it (PROTOCOL.md)."""

import json

import requests

from chat.models import RequestLog

UA = {"User-Agent": "predict-client/1.0"}


def greedy(prompt, **extra):
    return {"prompt": prompt, "temperature": 0, "top_k": 30, "top_p": 0.8, "max_new_tokens": 48, **extra}


def test_plain_text_body_is_the_prompt(stack, token, tmp_path):
    # A plain-text body takes every setting from the deployment: an operator's short default answer
    # length keeps the sampled answer (temperature 0.95 by default) brief.
    from chat.models import Deployment

    brief = Deployment.objects.get(name="default")
    brief.pk, brief.name, brief.queue, brief.default_max_new_tokens = None, f"brief-{tmp_path.name[-12:]}", "default", 24
    brief.save()
    question = tmp_path / "question.txt"
    question.write_text("What is the capital of France?")
    with open(question, "rb") as body:  # what `curl --data-binary @question.txt` sends
        response = requests.post(stack.predict_url(brief.name), headers={"Authorization": token}, data=body, timeout=120)
    assert response.status_code == 200, response.text
    data = json.loads(response.content)
    assert data["response"].strip()
    assert data["history"] == [["What is the capital of France?", data["response"]]]
    assert data["usage"]["prompt_tokens"] > 0 and 0 < data["usage"]["completion_tokens"] <= 24


def test_capital_of_france_is_paris_at_temperature_zero(stack, token):
    payload = greedy("What is the capital of France?", history=[])
    response = requests.post(stack.predict_url(), headers={**UA, "Authorization": token}, json=payload, timeout=120)
    assert response.status_code == 200, response.text
    assert "Paris" in json.loads(response.content)["response"]


def test_json_body_appends_the_new_pair_to_the_history(stack, token):
    history = [["My name is Ada.", "Nice to meet you, Ada!"]]
    payload = greedy("What is my name?", system_prompt="You are a helpful assistant.", history=history)
    response = requests.post(stack.predict_url(), headers={**UA, "Authorization": token}, json=payload, timeout=120)
    assert response.status_code == 200, response.text
    data = json.loads(response.content)
    assert data["history"][:1] == history
    assert data["history"][1] == ["What is my name?", data["response"]]
    assert "Ada" in data["response"]


def test_bearer_token_is_accepted(stack, token):
    response = requests.post(
        stack.predict_url(), headers={"Authorization": f"Bearer {token}"}, json=greedy("Say hi.", max_new_tokens=4), timeout=120
    )
    assert response.status_code == 200, response.text


def test_stream_is_cumulative_and_ends_with_the_greedy_answer(stack, token):
    payload = greedy("What is the capital of Egypt?", history=[["", ""]])
    whole = requests.post(stack.predict_url(), headers={**UA, "Authorization": token}, json=payload, timeout=120)
    expected = json.loads(whole.content)["response"]

    streamed = requests.post(
        stack.predict_url(),
        headers={**UA, "Authorization": token},
        json={**payload, "use_stream_chat": True},
        stream=True,
        timeout=120,
    )
    assert streamed.status_code == 200
    answers = []
    for chunk in streamed.iter_lines(chunk_size=8192, decode_unicode=False, delimiter=b"\0"):
        if chunk:
            data = json.loads(chunk.decode("utf-8"))
            assert "error" not in data, data
            answers.append(data["response"])
            assert data["history"][-1] == ["What is the capital of Egypt?", data["response"]]
    assert len(answers) > 1, "the answer arrived in one piece, not streamed"
    for before, after in zip(answers, answers[1:]):
        assert after.startswith(before)
    assert answers[-1] == expected
    assert "Cairo" in expected


def test_each_request_is_stored_with_status_usage_and_timings(stack, token, user):
    payload = greedy("What is the capital of Russia?")
    response = requests.post(stack.predict_url(), headers={"Authorization": token}, json=payload, timeout=120)
    assert response.status_code == 200
    row = RequestLog.objects.get(user=user)
    assert row.status == RequestLog.Status.OK
    assert row.deployment.name == "default"
    assert row.protocol == "http"
    assert row.prompt == "What is the capital of Russia?"
    assert row.response == json.loads(response.content)["response"]
    assert row.params["temperature"] == 0 and row.params["max_new_tokens"] == 48
    assert row.prompt_tokens == response.json()["usage"]["prompt_tokens"]
    assert row.completion_tokens == response.json()["usage"]["completion_tokens"]
    assert row.queued_at <= row.started_at <= row.first_token_at <= row.finished_at
    assert row.finish_reason == "stop"


def test_max_new_tokens_limits_the_answer(stack, token, user):
    payload = greedy("Write a long story about a dragon.", max_new_tokens=5)
    response = requests.post(stack.predict_url(), headers={"Authorization": token}, json=payload, timeout=120)
    assert response.json()["usage"]["completion_tokens"] == 5
    assert RequestLog.objects.get(user=user).finish_reason == "length"


def test_max_new_tokens_of_habit_is_capped_to_the_context(stack, token):
    # Clients send 2048 by habit; with a 64-token context that is silently capped.
    from chat.models import Deployment

    small = Deployment.objects.get(name="default")
    small.pk, small.name, small.context_length = None, "default-small-context", 64
    small.queue = "default"
    small.save()
    payload = greedy("Write a long story about a dragon.", max_new_tokens=2048)
    response = requests.post(stack.predict_url(small.name), headers={"Authorization": token}, json=payload, timeout=120)
    assert response.status_code == 200, response.text
    usage = response.json()["usage"]
    assert usage["prompt_tokens"] + usage["completion_tokens"] <= 64


def test_the_only_token_of_a_one_token_answer_arrives(stack, token, user):
    # The web tier subscribes before it enqueues, so even an answer that is over at once is heard.
    payload = greedy("What is the capital of France?", max_new_tokens=1, use_stream_chat=True)
    response = requests.post(stack.predict_url(), headers={"Authorization": token}, json=payload, stream=True, timeout=120)
    objects = [json.loads(c) for c in response.iter_lines(delimiter=b"\0") if c]
    assert objects and objects[-1]["response"]
    assert objects[-1]["response"] == RequestLog.objects.get(user=user).response
