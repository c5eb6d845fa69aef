"""Fair turns between users (issue 22): a user with nothing running goes ahead of another user's
waiting requests, with one worker and with two on the queue; a user alone gets every slot; a
user's requests beyond max_waiting_per_user waiting get 429 at once; a waiting request hears its
place in line, never growing, down to 0 before its first token.

Starts are counted from the rows (`started_at`), never timed."""

import json
import time
import uuid

import requests
import websocket

from chat.models import Deployment, RequestLog
from llmsite.launcher import worker_command
from tests.chat import clients
from tests.chat.test_chat_socket import chat_socket
from tests.conftest import Process, wait_for_log, wait_ready

LONG = {"prompt": "Count from 1 to 300, writing each number on its own line.", "temperature": 0, "max_new_tokens": 300}
DEADLINE = 300  # a bound on polling, not a speed check


def fair_deployment(queue: str, **fields) -> Deployment:
    """A copy of the default deployment (its model and engine) on `queue`."""
    deployment = Deployment.objects.get(name="default")
    deployment.pk, deployment.name, deployment.queue = None, f"fair-{uuid.uuid4().hex[:8]}", queue
    fields = {"max_batch_size": 2, "max_concurrent_generations": 64, "max_waiting_per_user": 30, **fields}
    for name, value in fields.items():
        setattr(deployment, name, value)
    deployment.save()
    return deployment


def open_streams(stack, token, name, count) -> list:
    """`count` answers asked for at once on the predict WebSocket, each kept open (it runs or
    waits) until its socket is closed (which cancels it, or takes it out of the line)."""
    sockets = []
    for _ in range(count):
        socket = websocket.create_connection(stack.predict_ws_url(name), header=[f"Authorization: {token}"], timeout=DEADLINE)
        socket.send(json.dumps(LONG))
        sockets.append(socket)
    return sockets


def wait_until(predicate, what: str) -> None:
    deadline = time.monotonic() + DEADLINE
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def rows(user, name):
    return RequestLog.objects.filter(user=user, deployment__name=name)


def check_b_goes_ahead(stack, db_user_factory, deployment, slots: int) -> None:
    from chat.tokens import token_create

    a, b = db_user_factory(), db_user_factory()
    a_streams = open_streams(stack, token_create(user=a)[1], deployment.name, 20)
    try:
        wait_until(lambda: rows(a, deployment.name).count() == 20, "A's 20 rows")
        # A alone gets every slot: `slots` of A's run, the rest wait.
        wait_until(lambda: rows(a, deployment.name).filter(status="running").count() == slots, f"{slots} of A's answers running")
        assert rows(a, deployment.name).filter(status="queued").count() == 20 - slots
        answer = requests.post(
            stack.predict_url(deployment.name),
            headers={"Authorization": token_create(user=b)[1]},
            json={"prompt": "What is the capital of France?", "temperature": 0, "max_new_tokens": 4},
            timeout=DEADLINE,
        )
        assert answer.status_code == 200, answer.text
        b_started = rows(b, deployment.name).get().started_at
        a_before = rows(a, deployment.name).filter(started_at__lt=b_started).count()
        print(f"\n{slots} slots: A's answers started before B's: {a_before} ({slots} were running when B came)")
        assert a_before - slots <= 1, f"{a_before - slots} of A's waiting requests started before B's"
    finally:
        for socket in a_streams:
            socket.close()
    # A's requests left by their client leave the line (cancelled, never started).
    wait_until(lambda: not rows(a, deployment.name).filter(status__in=["queued", "running"]).exists(), "A's requests ended")
    assert rows(a, deployment.name).filter(status="cancelled", started_at=None).count() >= 10


def test_a_user_with_nothing_running_goes_ahead_of_another_users_waiting_requests(stack, db_user_factory):
    check_b_goes_ahead(stack, db_user_factory, fair_deployment("default"), slots=2)


def test_the_same_with_two_workers_on_the_queue(stack, db_user_factory):
    queue = f"fair-{uuid.uuid4().hex[:6]}"
    deployment = fair_deployment(queue)
    workers = [Process(f"worker-{queue}-{n}", worker_command([queue], hostname=f"{n}-{queue}@%h", concurrency=2)).start() for n in "ab"]
    try:
        for worker in workers:
            wait_ready(deployment.name, worker)
            wait_for_log(worker, " ready.")
        check_b_goes_ahead(stack, db_user_factory, deployment, slots=4)
        started = RequestLog.objects.filter(deployment=deployment).exclude(started_at=None)
        assert len({row.worker for row in started}) == 2  # both workers started answers
        logs = "".join(worker.log_path.read_text(errors="replace") for worker in workers)
        assert all(logs.count(f"generation {row.id} started") == 1 for row in started)  # each once, on one worker
    finally:
        for worker in workers:
            worker.stop()


def test_a_users_31st_waiting_request_gets_429_at_once(stack, user, token):
    deployment = fair_deployment("default", max_batch_size=1)
    streams = open_streams(stack, token, deployment.name, 31)  # one runs, 30 wait
    try:
        wait_until(lambda: rows(user, deployment.name).count() == 31, "31 rows")
        wait_until(lambda: rows(user, deployment.name).filter(status="running").exists(), "one running")
        refused = requests.post(stack.predict_url(deployment.name), headers={"Authorization": token}, json=LONG, timeout=DEADLINE)
        assert refused.status_code == 429, refused.text
        assert "max_waiting_per_user" in refused.json()["error"]["message"]
        assert int(refused.headers["Retry-After"]) >= 1
    finally:
        for response in streams:
            response.close()


def test_a_waiting_chat_answer_hears_its_place_in_line_down_to_0_before_its_first_token(stack, db_user_factory):
    from chat.tokens import token_create

    deployment = fair_deployment("default", max_batch_size=1)
    a, c, d, b = (db_user_factory() for _ in range(4))
    ahead = []
    socket = chat_socket(stack, b)
    try:
        for n, someone in enumerate((a, c, d)):  # A's runs, then C's and D's wait
            ahead += open_streams(stack, token_create(user=someone)[1], deployment.name, 1)
            wait_until(lambda: rows(someone, deployment.name).exists(), "its row")
        wait_until(lambda: rows(a, deployment.name).filter(status="running").exists(), "A's answer running")
        socket.send(json.dumps({"type": "send", "deployment": deployment.name, "prompt": "Say hi.", "max_new_tokens": 4}))
        received, until = [], time.monotonic() + 300
        while not any(m["type"] == "queued" for m in received):
            received.append(clients.receive_json(socket, until=until))
        for response in ahead:
            response.close()  # the running answer is cancelled, the waiting ones leave: the line moves
        while received[-1]["type"] not in ("delta", "done", "error"):
            received.append(clients.receive_json(socket, until=until))
        positions = [m["position"] for m in received if m["type"] == "queued"]
        print(f"\nplaces heard before the first token: {positions}")
        assert received[-1]["type"] == "delta", received[-1]
        assert positions[0] == 2  # C's and D's start before it (they came first; all had nothing running)
        assert positions[-1] == 0
        assert positions == sorted(positions, reverse=True)
    finally:
        socket.close()
        for response in ahead:
            response.close()
