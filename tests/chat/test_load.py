"""Load on one web process: 200 WebSockets held open with 50 of them streaming at once, then 1,000
connect/disconnect cycles. Every stream answers its own question exactly as it is answered alone,
no socket is dropped, and the web process's memory stays bounded and then flat.

The figures are printed (pytest -s) and kept in docs/reliability-figures.md.
"""

import json
import select
import threading
import time

import psutil
import pytest
import websocket

from tests.chat import clients
from tests.conftest import start_web

CONNECTIONS = 200
STREAMING = 50
CYCLES = 1000
MAX_NEW_TOKENS = 12
# Questions with a known answer, asked greedily; each stream's answer must be its own question's.
QUESTIONS = {
    "What is the capital of France?": "Paris",
    "What is the capital of Germany?": "Berlin",
    "What is the capital of Japan?": "Tokyo",
    "What is the capital of the United Kingdom?": "London",
    "What is the capital of Russia?": "Moscow",
    "What is the capital of China?": "Beijing",
    "How many days are in a week?": "7",
    "Who wrote Romeo and Juliet?": "Shakespeare",
}
MiB = 2**20


def ask(question: str) -> dict:
    return {"prompt": question, "temperature": 0, "max_new_tokens": MAX_NEW_TOKENS}


def read_answer(ws) -> tuple[str, dict | None]:
    pieces, error = [], None
    while (message := clients.receive(ws)) != clients.EOS:
        if message.startswith('{"error"'):
            error = json.loads(message)["error"]
        else:
            pieces.append(message)
    return "".join(pieces), error


def answer_pings(sockets, stop: threading.Event) -> None:
    """Idle sockets still answer the server's pings, as a client's event loop does (Daphne closes
    a socket that leaves its pings unanswered)."""
    by_fd = {ws.sock.fileno(): ws for ws in sockets}
    while not stop.is_set():
        readable, _, _ = select.select(list(by_fd), [], [], 0.5)
        for fd in readable:
            by_fd[fd].recv_data_frame(True)  # a ping is answered with a pong inside


@pytest.fixture
def one_user_may_wait_for_all(stack):
    """All 50 streams are one user's: beyond the engine's batch they wait in that user's line,
    which `max_waiting_per_user` (default 16) would cap (that limit has its own tests)."""
    from chat.models import Deployment

    before = Deployment.objects.get(name="default").max_waiting_per_user
    Deployment.objects.filter(name="default").update(max_waiting_per_user=STREAMING)
    yield
    Deployment.objects.filter(name="default").update(max_waiting_per_user=before)


def test_200_open_sockets_with_50_streaming_each_get_their_own_answer_and_memory_stays_flat(stack, token, one_user_may_wait_for_all):
    web, url = start_web()
    daphne = psutil.Process(web.popen.pid)
    ws_url = "ws" + url.removeprefix("http") + "/api/predict/default"
    header = [f"Authorization: {token}"]
    sockets = []
    try:
        # Each question alone first: the greedy answer every concurrent stream must reproduce.
        alone = {}
        for question, expected in QUESTIONS.items():
            out = clients.predict_ws_stream(ws_url, token, ask(question))
            alone[question] = "".join(out.pieces)
            assert out.error is None and expected in alone[question], (question, alone[question])
        rss_idle = daphne.memory_info().rss

        started = time.monotonic()
        sockets = [websocket.create_connection(ws_url, header=header, timeout=300) for _ in range(CONNECTIONS)]
        opened_in = time.monotonic() - started
        rss_open = daphne.memory_info().rss
        questions = list(QUESTIONS)
        asked = {n: questions[n % len(questions)] for n in range(STREAMING)}
        got: dict[int, tuple[str, dict | None]] = {}
        peak, done = [rss_open], threading.Event()

        def stream(n):
            try:
                sockets[n].send(json.dumps(ask(asked[n])))
                got[n] = read_answer(sockets[n])
            except Exception as exc:  # a dropped socket shows up as a missing or failed answer
                got[n] = ("", {"message": repr(exc)})

        def sample():
            while not done.is_set():
                peak.append(daphne.memory_info().rss)
                done.wait(0.1)

        sampler = threading.Thread(target=sample)
        sampler.start()
        pinged = threading.Thread(target=answer_pings, args=(sockets[STREAMING:], done))
        pinged.start()
        threads = [threading.Thread(target=stream, args=(n,)) for n in range(STREAMING)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(600)
        done.set()
        sampler.join()
        pinged.join()

        # Its own question's answer: no error and the known answer in it. (Not always the very text
        # it gets alone: llama.cpp's batched kernels round differently from one row at a time.)
        wrong = {
            n: got.get(n)
            for n in range(STREAMING)
            if got.get(n, ("", "missing"))[1] is not None or QUESTIONS[asked[n]] not in got[n][0]
        }
        same_as_alone = sum(1 for n in range(STREAMING) if got.get(n) == (alone[asked[n]], None))
        # The 150 idle sockets are still there: each answers a settings-only message with <EOS>.
        idle_alive = 0
        for ws in sockets[STREAMING:]:
            ws.send(json.dumps({"system_prompt": ""}))
            idle_alive += clients.receive(ws) == clients.EOS
        for ws in sockets:
            ws.close()
        sockets = []

        def cycles(count):
            for _ in range(count):
                websocket.create_connection(ws_url, header=header, timeout=60).close()

        def cycles_in_parallel(count, clients_at_once=4):
            workers = [threading.Thread(target=cycles, args=(count // clients_at_once,)) for _ in range(clients_at_once)]
            for worker in workers:
                worker.start()
            for worker in workers:
                worker.join()

        started = time.monotonic()
        cycles_in_parallel(CYCLES // 5)
        rss_cycles_warm = daphne.memory_info().rss
        cycles_in_parallel(CYCLES - CYCLES // 5)
        rss_cycles_end = daphne.memory_info().rss
        cycled_in = time.monotonic() - started
        answered = sum(1 for n in range(STREAMING) if n not in wrong)
        print(
            f"\nload: {CONNECTIONS} WebSockets open, {STREAMING} streaming {MAX_NEW_TOKENS} tokens at once: "
            f"{answered}/{STREAMING} answered their own question ({same_as_alone} word for word as alone), "
            f"{idle_alive}/{CONNECTIONS - STREAMING} idle sockets alive\n"
            f"load: Daphne RSS {rss_idle / MiB:.0f} MiB idle, {rss_open / MiB:.0f} MiB with {CONNECTIONS} open, "
            f"{max(peak) / MiB:.0f} MiB at peak while streaming\n"
            f"load: {CYCLES} connect/disconnect cycles: Daphne RSS {rss_cycles_warm / MiB:.0f} MiB after {CYCLES // 5}, "
            f"{rss_cycles_end / MiB:.0f} MiB after {CYCLES} (opening {CONNECTIONS} took {opened_in:.0f} s, the cycles {cycled_in:.0f} s)"
        )
        assert not wrong, f"{len(wrong)} streams did not answer their own question: {dict(list(wrong.items())[:5])}"
        assert idle_alive == CONNECTIONS - STREAMING
        assert (max(peak) - rss_idle) / MiB < 150, "the web process grew without bound under 200 sockets"
        assert (rss_cycles_end - rss_cycles_warm) / MiB < 10, "connect/disconnect cycles leak memory in the web process"
        assert web.alive()
    finally:
        for ws in sockets:
            ws.close()
        web.stop()
