"""A web process serves more clients than the soft limit of open files it was started with. Each
client's socket is an open file, and many systems start processes with a soft limit of 1024; the
web server raises its own toward the hard limit (llmsite.daphne_server.raise_open_files_limit).
"""

import json
import shutil
import time

import pytest
import websocket

from llmsite.embedded import _free_port
from llmsite.launcher import port_open, web_command
from tests.chat import clients
from tests.conftest import Process

SOFT, HARD = 128, 4096
SOCKETS = 300  # with the web process's own files (libraries, logs, PostgreSQL, Redis), far past SOFT


def open_files_limit(pid: int) -> tuple[int, int]:
    with open(f"/proc/{pid}/limits") as limits:
        line = next(line for line in limits if line.startswith("Max open files"))
    soft, hard = line.split()[3:5]
    return int(soft), int(hard)


@pytest.mark.skipif(shutil.which("prlimit") is None, reason="needs util-linux's prlimit")
def test_a_web_process_started_with_a_low_open_files_limit_serves_more_sockets_than_it(stack, token):
    port = _free_port()
    web = Process(f"daphne-{port}", ["prlimit", f"--nofile={SOFT}:{HARD}", *web_command("127.0.0.1", port)]).start()
    sockets = []
    try:
        deadline = time.monotonic() + 60
        while not port_open("127.0.0.1", port):
            assert web.alive() and time.monotonic() < deadline, web.log_tail()
            time.sleep(0.2)
        assert open_files_limit(web.popen.pid) == (HARD, HARD)

        url = f"ws://127.0.0.1:{port}/api/predict/default"
        for n in range(SOCKETS):
            try:
                sockets.append(websocket.create_connection(url, header=[f"Authorization: {token}"], timeout=20))
            except (OSError, websocket.WebSocketException) as error:
                pytest.fail(f"socket {n + 1} of {SOCKETS} was refused ({error!r}):\n{web.log_tail()}")
        for ws in sockets:  # each is served: a settings-only message is answered with <EOS>
            ws.send(json.dumps({"system_prompt": ""}))
            assert clients.receive(ws) == clients.EOS
        assert web.alive()
    finally:
        for ws in sockets:
            ws.close()
        web.stop()
