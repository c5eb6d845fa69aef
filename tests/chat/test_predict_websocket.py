"""The predict API over WebSocket, driven with websocket-client as existing clients drive it."""

import json
import struct
import threading

import websocket

from chat.models import RequestLog
from tests.chat import clients

EOS = "<EOS>"


def run_client(url, token, messages, *, expected_eos=None, timeout=180):
    """WebSocketApp + run_forever(ping_interval=2), as the clients do; returns the messages received."""
    expected_eos = len(messages) if expected_eos is None else expected_eos
    received, eos_count = [], [0]

    def on_open(ws):
        for params in messages:
            ws.send(json.dumps(params, ensure_ascii=False).encode("utf8"))

    def on_message(ws, message):
        received.append(message)
        if message == EOS:
            eos_count[0] += 1
            if eos_count[0] >= expected_eos:
                ws.send(struct.pack("!H", 1000), websocket.ABNF.OPCODE_CLOSE)

    app = websocket.WebSocketApp(url, on_open=on_open, on_message=on_message, header=[f"Authorization: {token}"])
    timer = threading.Timer(timeout, app.close)
    timer.start()
    try:
        app.run_forever(ping_interval=2)
    finally:
        timer.cancel()
    return received


def answers(received):
    """Split the received messages into answers at each <EOS>."""
    out, current = [], []
    for message in received:
        if message == EOS:
            out.append(current)
            current = []
        else:
            current.append(message)
    return out


def test_stream_of_deltas_ends_with_eos(stack, token):
    params = {"prompt": "What is the capital of France?", "temperature": 0, "max_new_tokens": 32}
    received = run_client(stack.predict_ws_url(), token, [params])
    assert received[-1] == EOS
    deltas = received[:-1]
    assert len(deltas) > 1, "expected the answer in several pieces"
    assert "Paris" in "".join(deltas)


def test_deltas_join_to_the_http_answer(stack, token):
    import requests

    params = {"prompt": "What is the capital of Canada?", "temperature": 0, "max_new_tokens": 32}
    received = run_client(stack.predict_ws_url(), token, [params])
    http = requests.post(stack.predict_url(), headers={"Authorization": token}, json=params, timeout=120).json()
    assert "".join(received[:-1]) == http["response"]


def test_not_streaming_sends_the_whole_answer_once(stack, token):
    params = {"prompt": "What is the capital of Egypt?", "temperature": 0, "max_new_tokens": 32, "use_stream_chat": False}
    received = run_client(stack.predict_ws_url(), token, [params])
    assert len(received) == 2 and received[1] == EOS
    assert "Cairo" in received[0]


def test_multi_round_system_prompt_first_then_four_prompts_at_once(stack, token, user):
    system = "You are a helpful assistant."
    messages = [{"system_prompt": system}] + [
        {"system_prompt": system, "prompt": f"What is the capital of {country}?", "temperature": 0, "max_new_tokens": n}
        for country, n in (("France", 24), ("Egypt", 25), ("Russia", 26), ("Germany", 27))
    ]
    received = run_client(stack.predict_ws_url(), token, messages)
    assert received.count(EOS) == 5
    assert received[0] == EOS, "the settings-only message is answered with <EOS> alone"
    parts = ["".join(a) for a in answers(received)[1:]]
    for answer, city in zip(parts, ("Paris", "Cairo", "Moscow", "Berlin")):
        assert city in answer
    rows = list(RequestLog.objects.filter(user=user).order_by("queued_at"))
    assert [r.prompt for r in rows] == [m["prompt"] for m in messages[1:]]
    assert all(r.system_prompt == system and r.protocol == "websocket" and r.status == "ok" for r in rows)
    # the connection keeps its own history: each request carries the answers before it
    assert [len(r.history) for r in rows] == [0, 1, 2, 3]


def test_a_bad_message_gets_an_error_and_the_socket_stays_open(stack, token):
    messages = [{"prompt": "hi", "temperature": "hot"}, {"prompt": "What is the capital of France?", "temperature": 0, "max_new_tokens": 16}]
    received = run_client(stack.predict_ws_url(), token, messages)
    first, second = answers(received)
    error = json.loads(first[0])["error"]
    assert error["type"] == "invalid_request_error" and error["param"] == "temperature"
    assert "Paris" in "".join(second)


def _handshake_close_code(url, header):
    ws = websocket.create_connection(url, header=header, timeout=30)
    try:
        body = clients.receive(ws)
        opcode, frame = ws.recv_data(control_frame=True)
    finally:
        ws.close()
    return json.loads(body), opcode, struct.unpack("!H", frame[:2])[0]


def test_wrong_token_closes_with_4401_before_any_work(stack, user):
    before = RequestLog.objects.count()
    body, opcode, code = _handshake_close_code(stack.predict_ws_url(), ["Authorization: nope"])
    assert opcode == websocket.ABNF.OPCODE_CLOSE and code == 4401
    assert body["error"]["type"] == "authentication_error"
    assert RequestLog.objects.count() == before


def test_unknown_deployment_closes_with_4404(stack, token):
    body, _, code = _handshake_close_code(stack.predict_ws_url("no-such-model"), [f"Authorization: Bearer {token}"])
    assert code == 4404 and "no-such-model" in body["error"]["message"]


def test_each_message_uses_the_deployment_as_it_is_now(stack, user):
    """An operator's edit reaches an open socket at its next message (each message reads the
    deployment again and sends what it read to the worker)."""
    from chat.models import Deployment
    from chat.tokens import token_create

    _, raw = token_create(user=user)
    deployment = Deployment.objects.get(name="default")
    original = deployment.default_max_new_tokens
    ws = websocket.create_connection(stack.predict_ws_url(), header=[f"Authorization: {raw}"], timeout=120)
    try:
        for default in (5, 3):
            Deployment.objects.filter(pk=deployment.pk).update(default_max_new_tokens=default)
            ws.send(json.dumps({"prompt": "Write a short paragraph about owls.", "temperature": 0}))
            while clients.receive(ws) != EOS:
                pass
    finally:
        ws.close()
        Deployment.objects.filter(pk=deployment.pk).update(default_max_new_tokens=original)
    rows = list(RequestLog.objects.filter(user=user).order_by("queued_at"))
    assert [r.params["max_new_tokens"] for r in rows] == [5, 3]
    assert [r.completion_tokens for r in rows] == [5, 3]
