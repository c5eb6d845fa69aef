"""One-machine start: `python -m llmsite.launcher run` (what `make run` calls) and `... services -- CMD`.

`run` starts the embedded PostgreSQL and Redis where DATABASE_URL / REDIS_URL are not set,
migrates, creates the default deployment, starts a Celery worker and Daphne, prints the URL and
the admin login, restarts a child that dies, and stops everything on Ctrl-C / SIGTERM.
`services` starts only the servers, runs CMD with their URLs in its environment, then stops them
(`make test` runs pytest this way). Never imports torch.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from chat.chat_formats import MODEL_TYPES  # plain data, no Django
from llmsite import embedded

BASE_DIR = Path(__file__).resolve().parent.parent


def say(message: str) -> None:
    print(f"[llmsite] {message}", flush=True)


def data_dir_from_env() -> Path:
    path = Path(os.environ.get("LLMSITE_DATA_DIR") or BASE_DIR / "var")
    return path if path.is_absolute() else BASE_DIR / path


def start_services(data_dir: Path) -> embedded.EmbeddedServices:
    services = embedded.start(
        data_dir, database_url=os.environ.get("DATABASE_URL"), redis_url=os.environ.get("REDIS_URL")
    )
    os.environ.update(services.env())
    os.environ["LLMSITE_DATA_DIR"] = str(data_dir)
    for name in services.started:
        say(f"started embedded {name} in {data_dir}")
    return services


def worker_command(queues: list[str], *, hostname: str = "default@%h", concurrency: int | None = None) -> list[str]:
    command = [sys.executable, "-m", "celery", "-A", "workers", "worker", "-Q", ",".join(queues)]
    command += ["-P", "threads", "--hostname", hostname, "--loglevel", "INFO", "--without-gossip", "--without-mingle"]
    if concurrency:
        command += ["-c", str(concurrency)]
    return command


def web_command(host: str, port: int) -> list[str]:
    # Daphne with a bound on each slow client's unsent data (llmsite/daphne_server.py).
    return [sys.executable, "-m", "llmsite.daphne_server", "-b", host, "-p", str(port), "llmsite.asgi:application"]


def port_open(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


class Child:
    """A supervised child process, restarted if it dies while the site runs."""

    def __init__(self, name: str, command: list[str], env: dict | None = None):
        self.name, self.command, self.env = name, command, env or {}
        self.process: subprocess.Popen | None = None
        self.restarts = 0

    def start(self) -> None:
        self.process = subprocess.Popen(self.command, cwd=BASE_DIR, env={**os.environ, **self.env})

    def check(self) -> None:
        if self.process is not None and self.process.poll() is not None:
            self.restarts += 1
            say(f"{self.name} exited with {self.process.returncode}; restarting it (restart {self.restarts})")
            time.sleep(min(5, self.restarts))
            self.start()

    def stop(self, timeout: float = 15) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.terminate()
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def run(args) -> int:
    data_dir = data_dir_from_env()
    if args.host not in ("127.0.0.1", "localhost", "::1") and "DJANGO_ALLOWED_HOSTS" not in os.environ:
        say(f"serving on {args.host}: accepting any Host header (set DJANGO_ALLOWED_HOSTS to restrict it)")
        os.environ["DJANGO_ALLOWED_HOSTS"] = "*"
    services = start_services(data_dir)
    children: list[Child] = []
    stopping = False

    def on_signal(signum, frame):
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        queues, vllm_queues = _prepare_site(args)
        os.environ["WORKER_METRICS_PORT"] = str(worker_metrics_port(args.port))
        children = [*worker_children(queues, vllm_queues, args.concurrency), Child("web", web_command(args.host, args.port))]
        for child in children:
            child.start()

        ready = _wait_until_ready(children, args, lambda: stopping)
        if ready:
            _print_welcome(args, data_dir)
        while not stopping:
            for child in children:
                child.check()
            time.sleep(0.5)
        return 0
    finally:
        say("stopping")
        for child in reversed(children):
            child.stop()
        services.stop()
        say("stopped")


def vllm_python() -> str | None:
    """The Python of the vLLM workers' own environment (.venv-vllm, `make vllm-venv`), where this
    environment has no vLLM (vLLM pins an older transformers than the site); None where it has."""
    import importlib.util

    if importlib.util.find_spec("vllm") is not None:
        return None
    path = BASE_DIR / ".venv-vllm" / "bin" / "python"
    return str(path) if path.exists() else None


def worker_children(queues: list[str], vllm_queues: list[str], concurrency: int | None) -> list[Child]:
    """One worker for every queue; where vLLM lives in an environment of its own, the queues of vllm
    deployments get a worker run by that environment's Python (its /metrics on a port of its own)."""
    python = vllm_python()
    if not vllm_queues or python is None:
        return [Child("worker", worker_command(queues, concurrency=concurrency))]
    rest = [q for q in queues if q not in vllm_queues]
    vllm_command = [python, *worker_command(vllm_queues, hostname="vllm@%h", concurrency=concurrency)[1:]]
    say(f"the vllm deployments' queues ({', '.join(vllm_queues)}) get a worker of {python}")
    return [
        Child("worker", worker_command(rest, concurrency=concurrency)),
        Child("worker-vllm", vllm_command, {"WORKER_METRICS_PORT": str(embedded._free_port())}),
    ]


def _prepare_site(args) -> tuple[list[str], list[str]]:
    """Migrate, set up the default deployment as asked, and name the queues the workers serve (all,
    and those of vllm deployments)."""
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "llmsite.settings")
    import django
    from django.core.management import call_command

    django.setup()
    call_command("migrate", interactive=False, verbosity=0)
    say("database ready (migrations applied)")
    options = ["--model", args.model] if args.model else []
    options += ["--model-type", args.model_type] if args.model_type else []
    options += ["--precision", args.precision] if args.precision else []
    options += ["--engine", args.engine] if args.engine else []
    options += ["--trust-remote-code"] if args.trust_remote_code else []
    call_command("setup_site", *options)

    from django.conf import settings
    from django.db import connections

    from chat.models import Deployment

    served = Deployment.objects.filter(enabled=True)
    # Statuses left by an earlier run say nothing about the worker started now.
    served.update(status=Deployment.Status.UNKNOWN, status_detail="waiting for the worker")
    queues = sorted({d.queue for d in served} | {settings.EMBEDDING_QUEUE})
    vllm_queues = sorted({d.queue for d in served if d.engine == Deployment.Engine.VLLM} - {settings.EMBEDDING_QUEUE})
    connections.close_all()
    return queues, vllm_queues


def worker_metrics_port(web_port: int) -> int:
    """The port of the worker's /metrics: WORKER_METRICS_PORT, else the one after the site's, else any free one."""
    if os.environ.get("WORKER_METRICS_PORT"):
        return int(os.environ["WORKER_METRICS_PORT"])
    host = os.environ.get("WORKER_METRICS_HOST") or "127.0.0.1"
    return web_port + 1 if not port_open(host if host not in ("0.0.0.0", "::") else "127.0.0.1", web_port + 1) else embedded._free_port()


def _wait_until_ready(children, args, stopping) -> bool:
    from chat.models import Deployment
    from django.db import close_old_connections

    last = None
    while not stopping():
        for child in children:
            child.check()
        close_old_connections()
        states = {d.name: (d.status, d.status_detail) for d in Deployment.objects.filter(enabled=True)}
        close_old_connections()
        web_up = port_open(args.host if args.host != "0.0.0.0" else "127.0.0.1", args.port)
        summary = ", ".join(f"{name}: {status}" for name, (status, _) in states.items())
        if summary != last:
            say(f"deployments: {summary}; web: {'up' if web_up else 'starting'}")
            last = summary
        failed = {n: d for n, (s, d) in states.items() if s == Deployment.Status.FAILED}
        for name, detail in failed.items():
            say(f"deployment {name} FAILED to load: {detail}")
        if web_up and all(s in (Deployment.Status.READY, Deployment.Status.FAILED) for s, _ in states.values()):
            return True
        time.sleep(1)
    return False


def _print_welcome(args, data_dir: Path) -> None:
    host = "127.0.0.1" if args.host in ("0.0.0.0", "::") else args.host
    url = f"http://{host}:{args.port}"
    password_file = data_dir / "admin-password"
    if password_file.exists():
        login = f"user 'admin', password {password_file.read_text().strip()} (kept in {password_file})"
    else:
        login = "your superuser (python manage.py createsuperuser)"
    say("")
    say(f"The site is up: {url}   admin: {url}/admin/")
    say(f"Log in as {login}")
    say("API token: .venv/bin/python manage.py create_token admin")
    say(f"Predict:   curl {url}/api/predict/default -H 'Authorization: <token>' --data 'Hello!'")
    worker_host = os.environ.get("WORKER_METRICS_HOST") or "127.0.0.1"
    worker_host = "127.0.0.1" if worker_host in ("0.0.0.0", "::") else worker_host
    say(f"Metrics:   {url}/metrics (web), http://{worker_host}:{os.environ['WORKER_METRICS_PORT']}/metrics (worker)")
    say("Ctrl-C stops everything.")


class _Interrupted(BaseException):
    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


def _interrupted(signum, frame):
    raise _Interrupted(signum)


def services_then(args) -> int:
    data_dir = data_dir_from_env()
    if args.fresh and data_dir.exists():
        shutil.rmtree(data_dir)
    services = start_services(data_dir)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    # SIGINT and SIGTERM stop the command, then the services, even where this process was started
    # with SIGINT ignored (a background job of a script, nohup): Python then leaves it ignored
    signal.signal(signal.SIGINT, _interrupted)
    signal.signal(signal.SIGTERM, _interrupted)
    try:
        code = subprocess.call(command, cwd=BASE_DIR, env=os.environ.copy())  # kills the command when interrupted
    except _Interrupted as stop:
        code = 128 + stop.signum
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # nothing interrupts the services' stop
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        services.stop()
    if code == 5 and Path(command[0]).name.startswith("pytest"):
        say("pytest collected no tests: failing the run (exit code 5)")
        return 1
    return code


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m llmsite.launcher")
    sub = parser.add_subparsers(dest="what", required=True)
    run_parser = sub.add_parser("run", help="start the whole site")
    run_parser.add_argument("--host", default=os.environ.get("HOST", "127.0.0.1"))
    run_parser.add_argument("--port", type=int, default=int(os.environ.get("PORT", "8000")))
    run_parser.add_argument("--model", default=os.environ.get("MODEL", ""))
    run_parser.add_argument("--model-type", default=os.environ.get("MODEL_TYPE", ""), choices=["", *MODEL_TYPES])
    run_parser.add_argument("--precision", default=os.environ.get("PRECISION", ""), choices=["", "fp32", "bf16", "fp16"])
    run_parser.add_argument(
        "--trust-remote-code", action="store_true", default=os.environ.get("TRUST_REMOTE_CODE", "") in ("1", "true", "yes")
    )
    run_parser.add_argument("--engine", default=os.environ.get("ENGINE", ""))
    run_parser.add_argument("--concurrency", type=int, default=None)
    svc = sub.add_parser("services", help="start the database and Redis, run a command, stop them")
    svc.add_argument("--fresh", action="store_true", help="start from an empty data folder")
    svc.add_argument("command", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    return run(args) if args.what == "run" else services_then(args)


if __name__ == "__main__":
    sys.exit(main())
