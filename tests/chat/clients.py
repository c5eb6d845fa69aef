"""Stream readers for the three streaming protocols, each noting when every piece arrived.

Each reader returns a `Received`: the answer's pieces in order, the error object if the stream
ended with one, and the monotonic time of each piece, so fault tests can say when a client heard.
"""

import json
import time
from dataclasses import dataclass, field

import requests
import websocket

EOS = "<EOS>"


@dataclass
class Received:
    pieces: list = field(default_factory=list)  # the text of each piece as the protocol gives it
    times: list = field(default_factory=list)
    error: dict | None = None
    error_at: float | None = None
    ended: bool = False  # the protocol's end marker arrived (<EOS>, [DONE], or the stream closed)

    def note(self, piece: str) -> None:
        self.pieces.append(piece)
        self.times.append(time.monotonic())

    def fail(self, error: dict) -> None:
        self.error, self.error_at = error, time.monotonic()


def receive(socket: websocket.WebSocket, timeout: float = 300, *, until: float | None = None) -> str:
    """The socket's next text message ("" once the server closed it); fails after `timeout` s
    without one, or at `until` (a `time.monotonic()` deadline). A socket's own timeout is per
    frame, and Daphne's pings (every 20 s) would keep a silent server from ever reaching it; a
    loop that reads until some message passes all its reads one `until`, as the chat page's
    place-in-line reminders (every 10 s) would keep each read's own timeout from passing."""
    opcode, data = _next_message(socket, timeout, until)
    return data.decode("utf-8") if opcode == websocket.ABNF.OPCODE_TEXT else ""


def receive_json(socket: websocket.WebSocket, timeout: float = 300, *, until: float | None = None) -> dict:
    """The socket's next message, parsed (see `receive`)."""
    opcode, data = _next_message(socket, timeout, until)
    assert opcode == websocket.ABNF.OPCODE_TEXT, f"the server closed the socket: {data!r}"
    return json.loads(data)


def _next_message(socket: websocket.WebSocket, timeout: float, until: float | None) -> tuple[int, bytes]:
    """The next text or close frame (pings are answered on the way), read by `until`, else within `timeout` s."""
    deadline = time.monotonic() + timeout if until is None else until
    kept = socket.gettimeout()
    try:
        while True:
            left = deadline - time.monotonic()
            assert left > 0, "no message in time"
            socket.settimeout(left)
            try:
                opcode, frame = socket.recv_data_frame(control_frame=True)
            except (websocket.WebSocketTimeoutException, TimeoutError):
                raise AssertionError("no message in time") from None
            if opcode in (websocket.ABNF.OPCODE_TEXT, websocket.ABNF.OPCODE_CLOSE):
                return opcode, frame.data
    finally:
        socket.settimeout(kept)


def predict_http_stream(url: str, token: str, body: dict, out: Received | None = None) -> Received:
    """`POST /api/predict/<d>` with use_stream_chat: NUL-delimited cumulative objects."""
    out = out or Received()
    response = requests.post(url, headers={"Authorization": token}, json={**body, "use_stream_chat": True}, stream=True, timeout=300)
    assert response.status_code == 200, response.text
    for chunk in response.iter_lines(chunk_size=8192, decode_unicode=False, delimiter=b"\0"):
        if chunk:
            obj = json.loads(chunk.decode("utf-8"))
            if "error" in obj:
                out.fail(obj["error"])
            else:
                out.note(obj["response"])
    out.ended = True
    return out


def predict_ws_stream(url: str, token: str, body: dict, out: Received | None = None) -> Received:
    """One message on the predict WebSocket: deltas, then <EOS>."""
    out = out or Received()
    ws = websocket.create_connection(url, header=[f"Authorization: {token}"], timeout=300)
    try:
        ws.send(json.dumps(body, ensure_ascii=False))
        while (message := receive(ws)) != EOS:
            if message.startswith('{"error"'):
                out.fail(json.loads(message)["error"])
            else:
                out.note(message)
        out.ended = True
    finally:
        ws.close()
    return out


def openai_sse_stream(base_url: str, token: str, body: dict, out: Received | None = None) -> Received:
    """`POST /v1/chat/completions` with stream: true: server-sent events, then `data: [DONE]`."""
    out = out or Received()
    response = requests.post(
        f"{base_url}/v1/chat/completions", headers={"Authorization": f"Bearer {token}"}, json={**body, "stream": True}, stream=True, timeout=300
    )
    assert response.status_code == 200, response.text
    for line in response.iter_lines(decode_unicode=False):
        if not line.startswith(b"data: "):
            continue
        data = line[len(b"data: ") :]
        if data == b"[DONE]":
            out.ended = True
            break
        obj = json.loads(data)
        if "error" in obj:
            out.fail(obj["error"])
        elif obj.get("choices") and obj["choices"][0]["delta"].get("content"):
            out.note(obj["choices"][0]["delta"]["content"])
    out.ended = True
    return out
