"""A client that reads its stream slowly, or not at all, holds back only its own stream: the web
process's memory stays bounded and another client's answer streams to its end meanwhile.

The flood comes from a stand-in for the worker that appends to the request's Redis Stream as a
worker does, only far faster: the default model on 2 CPU cores cannot produce megabytes quickly,
and the web tier sees the same events either way. The concurrent normal answer comes from the real
worker and model.
"""

import json
import socket
import threading
import time
import uuid

import psutil
import websocket
from django.conf import settings

from chat import events
from chat.models import RequestLog
from tests.chat import clients
from tests.chat.test_stream_failures import deployment_on_queue, hung_worker_on
from tests.conftest import start_web

PIECE = "x" * 1023 + " "  # 1 KiB of answer per event
HTTP_EVENTS = 400  # cumulative objects: about 80 MiB unsent if the server buffered it all
WS_EVENTS = 100_000  # deltas: about 100 MiB unsent if the server buffered it all
SMALL_BUFFER = 4096


def rss(process: psutil.Process) -> int:
    return process.memory_info().rss


def flood(user, count: int) -> None:
    """Publish `count` deltas and the final event for `user`'s request, as fast as Redis takes them."""
    deadline = time.monotonic() + 60
    while not (row := RequestLog.objects.filter(user=user).first()):
        assert time.monotonic() < deadline, "the request was never stored"
        time.sleep(0.05)
    key = events.channel(str(row.id))  # the request's stream: its reader starts from its first event
    pipe = events.sync_client().pipeline(transaction=False)
    pipe.xadd(key, {"e": json.dumps({"type": "start"})})
    for n in range(count):
        pipe.xadd(key, {"e": json.dumps({"type": "delta", "text": PIECE})})
        if n % 500 == 499:
            pipe.execute()
    usage = {"prompt_tokens": 1, "completion_tokens": count}
    pipe.xadd(key, {"e": json.dumps({"type": "final", "text": PIECE * count, "finish_reason": "length", "usage": usage})})
    pipe.expire(key, 600)
    pipe.execute()


def non_reading_http_client(url: str, path: str, token: str) -> socket.socket:
    """A predict stream request on a socket whose owner never reads the answer."""
    host, port = url.removeprefix("http://").split(":")
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, SMALL_BUFFER)
    sock.connect((host, int(port)))
    body = json.dumps({"prompt": "Flood me.", "use_stream_chat": True}).encode()
    head = f"POST {path} HTTP/1.1\r\nHost: {host}\r\nAuthorization: {token}\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    sock.sendall(head.encode() + body)
    return sock


def test_a_client_that_does_not_read_holds_back_only_its_own_stream(stack, db_user_factory):
    from chat.tokens import token_create

    web, url = start_web()
    daphne = psutil.Process(web.popen.pid)
    queue = f"firehose-{uuid.uuid4().hex[:6]}"
    firehose = deployment_on_queue(queue)
    hung_worker_on(queue)  # a liveness key, so the web tier takes requests for the stand-in
    http_user, ws_user, reader = db_user_factory(), db_user_factory(), db_user_factory()
    ws_url = "ws" + url.removeprefix("http") + f"/api/predict/{firehose.name}"
    slow_ws = None
    try:
        # Both kinds of stream run once first, so that what they load on first use is not counted.
        hi = {"prompt": "Hi", "max_new_tokens": 2}
        warm = [clients.predict_ws_stream("ws" + url.removeprefix("http") + "/api/predict/default", token_create(user=reader)[1], hi)]
        warm.append(clients.predict_http_stream(url + "/api/predict/default", token_create(user=reader)[1], hi))
        assert all(w.ended and w.error is None for w in warm)
        before = rss(daphne)

        slow_http = non_reading_http_client(url, f"/api/predict/{firehose.name}", token_create(user=http_user)[1])
        slow_ws = websocket.create_connection(
            ws_url, header=[f"Authorization: {token_create(user=ws_user)[1]}"], sockopt=[(socket.SOL_SOCKET, socket.SO_RCVBUF, SMALL_BUFFER)]
        )
        slow_ws.send(json.dumps({"prompt": "Flood me."}))
        floods = [threading.Thread(target=flood, args=args) for args in ((http_user, HTTP_EVENTS), (ws_user, WS_EVENTS))]
        for thread in floods:
            thread.start()

        peak, stop = [before], threading.Event()

        def sample():
            while not stop.is_set():
                peak.append(rss(daphne))
                time.sleep(0.05)

        sampler = threading.Thread(target=sample)
        sampler.start()
        # Meanwhile a normal client asks the real worker and reads its answer to the end.
        normal = clients.predict_ws_stream(
            "ws" + url.removeprefix("http") + "/api/predict/default",
            token_create(user=reader)[1],
            {"prompt": "What is the capital of France?", "temperature": 0, "max_new_tokens": 16},
        )
        for thread in floods:
            thread.join(120)
        time.sleep(3)  # whatever the server would buffer for the floods is buffered by now
        stop.set()
        sampler.join()
        grown = (max(peak) - before) / 2**20
        offered = (sum(len(PIECE) * n for n in range(1, HTTP_EVENTS + 1)) + len(PIECE) * WS_EVENTS) / 2**20
        print(
            f"\nslow readers: {offered:.0f} MiB offered to two clients that never read; Daphne RSS "
            f"{before / 2**20:.0f} MiB before, +{grown:.1f} MiB at peak (bound {settings.WEB_SEND_BUFFER_BYTES // 1024} KiB unsent per connection)"
        )
        assert normal.error is None and normal.ended and "Paris" in "".join(normal.pieces)
        # Buffering all of it would take about 180 MiB (556 MiB of growth with the bound off). The
        # process's own growth meanwhile (the normal client's answer, the allocator keeping freed
        # pages) is 5 to 30 MiB here, and once reached 71 MiB in CI with the smaller flood.
        assert grown < 100, f"the web process grew by {grown:.0f} MiB for clients that read nothing"
        assert web.alive()
        slow_http.close()
    finally:
        if slow_ws is not None:
            slow_ws.sock.close()
        web.stop()
        for row in RequestLog.objects.filter(user__in=[http_user, ws_user]):
            events.sync_client().delete(events.channel(str(row.id)))  # the floods' 100 MiB, not left for 10 minutes
