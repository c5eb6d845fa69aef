"""A predict WebSocket bounds what one client can pile on it."""

import json
import time
import struct

import websocket
from django.conf import settings

from tests.conftest import start_web


def close_code(ws) -> int:
    while True:
        opcode, data = ws.recv_data(control_frame=True)
        if opcode == websocket.ABNF.OPCODE_CLOSE:
            return struct.unpack("!H", data[:2])[0]


def test_a_message_over_the_size_limit_closes_the_socket_with_1009(stack, token):
    web, url = start_web(env={"PREDICT_MAX_BODY_BYTES": "2000"})
    try:
        ws = websocket.create_connection("ws" + url[4:] + "/api/predict/default", header=[f"Authorization: {token}"], timeout=60)
        ws.send(json.dumps({"prompt": "x" * 2001}))
        assert close_code(ws) == 1009
    finally:
        web.stop()


def test_a_flood_of_messages_gets_an_error_and_the_socket_closed(stack, token, user):
    from chat.models import RequestLog

    ws = websocket.create_connection(stack.predict_ws_url(), header=[f"Authorization: {token}"], timeout=60)
    message = json.dumps({"prompt": "Tell me a long story.", "max_new_tokens": 8, "temperature": 0})
    for _ in range(settings.WS_MAX_QUEUED_MESSAGES + 20):
        ws.send(message)
    frames, code = [], None
    while code is None:
        opcode, data = ws.recv_data(control_frame=True)
        if opcode == websocket.ABNF.OPCODE_CLOSE:
            code = struct.unpack("!H", data[:2])[0]
        elif opcode == websocket.ABNF.OPCODE_TEXT:
            frames.append(data.decode())
    assert code == 1008
    time.sleep(1)  # whatever the server still had to do for this socket is over by now
    rows = RequestLog.objects.filter(user=user).count()
    time.sleep(2)
    assert RequestLog.objects.filter(user=user).count() == rows, "the closed socket's messages still run"
    errors = [json.loads(f)["error"] for f in frames if f.startswith('{"error"')]
    assert any(e["type"] == "rate_limit_error" for e in errors)
    # the flood queued nothing beyond the limit
    assert RequestLog.objects.filter(user=user).count() <= settings.WS_MAX_QUEUED_MESSAGES + 1
