"""Concurrent clients each get their own answer, never another's."""

import json
import threading

import requests

from tests.chat.test_predict_websocket import run_client

QUESTIONS = {"France": "Paris", "Egypt": "Cairo", "Canada": "Ottawa", "Russia": "Moscow", "Germany": "Berlin"}


def test_two_websockets_and_three_http_streams_at_once(stack, token):
    results: dict[str, str] = {}
    errors: list[BaseException] = []

    def ask_ws(country):
        params = {"prompt": f"What is the capital of {country}?", "temperature": 0, "max_new_tokens": 32}
        received = run_client(stack.predict_ws_url(), token, [params])
        assert received[-1] == "<EOS>"
        results[country] = "".join(received[:-1])

    def ask_http(country):
        params = {"prompt": f"What is the capital of {country}?", "temperature": 0, "max_new_tokens": 32, "use_stream_chat": True}
        response = requests.post(stack.predict_url(), headers={"Authorization": token}, json=params, stream=True, timeout=300)
        last = None
        for chunk in response.iter_lines(chunk_size=8192, decode_unicode=False, delimiter=b"\0"):
            if chunk:
                last = json.loads(chunk.decode("utf-8"))
        results[country] = last["response"]

    def guard(func, country):
        try:
            func(country)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    countries = list(QUESTIONS)
    threads = [threading.Thread(target=guard, args=(ask_ws, c)) for c in countries[:2]]
    threads += [threading.Thread(target=guard, args=(ask_http, c)) for c in countries[2:]]
    for t in threads:
        t.start()
    for t in threads:
        t.join(600)
    assert not errors, errors
    assert set(results) == set(QUESTIONS)
    for country, answer in results.items():
        assert QUESTIONS[country] in answer, (country, answer)
        others = [city for c, city in QUESTIONS.items() if c != country]
        assert not any(city in answer for city in others), (country, answer)
