"""Redis failed over mid-stream, as a managed Redis or a proxy in front of two does it: the replica
becomes the primary, the old primary its replica, and the site's address (a DNS name, a proxy)
leads to the new one for connections made after. Connections made before stay on the old primary,
which refuses writes (READONLY) and ends blocked reads (UNBLOCKED). The answer in flight goes on
and its stream ends with the whole answer; the site then answers as before, with no restart, and
the first request after a failover while nothing was in flight is answered too.

A worker and Daphne reach two Valkeys of the test's own through a relay (tests/chat/test_redis_outage.py)
that the test points at the new primary after Valkey's own FAILOVER.
"""

import asyncio
import os
import subprocess
import sys
import time
import uuid

import pytest
import redis
import redis.asyncio as aioredis
import requests

from chat import events, stream_reader
from chat.models import ApiToken, RequestLog
from llmsite import redis_outage
from llmsite.embedded import _free_port
from tests.chat.test_redis_outage import Relay, alive, start_redis
from tests.chat.test_redis_restart import site_on, stream
from tests.chat.test_stream_failures import deployment_on_queue
from tests.metrics.conftest import wait_until
from tests.workers.test_orphans import left_running, name
from workers import orphans


@pytest.fixture(autouse=True)
def _no_failover_left():
    """The test process remembers the failovers its connections met (redis_outage.failed_over_lately):
    none is left to the tests after."""
    yield
    redis_outage._Failovers.met_at = redis_outage._Failovers.began_at = -float("inf")


@pytest.fixture
def primary_and_replica(tmp_path):
    pair = []
    for role in ("primary", "replica"):
        holder = {"port": _free_port(), "dir": tmp_path / role}
        start_redis(holder)
        holder["client"] = redis.Redis(port=holder["port"])
        pair.append(holder)
    primary, replica = pair
    replica["client"].replicaof("127.0.0.1", primary["port"])
    wait_until(lambda: replica["client"].info("replication")["master_link_status"] == "up", "the replica in sync", 30)
    yield primary, replica
    for holder in pair:
        holder["client"].close()
        holder["server"].stop()


def test_a_failover_mid_stream(primary_and_replica, stack, user, token):
    primary, replica = primary_and_replica
    # A limited token: the first write of each request is its rate limit's (chat/ratelimits.py).
    ApiToken.objects.filter(user=user).update(requests_per_minute=1000)
    relay = Relay(upstream=primary["port"])
    redis_url = f"redis://127.0.0.1:{relay.port}/0"
    queue = f"redis-failover-{uuid.uuid4().hex[:6]}"
    deployment = deployment_on_queue(queue)
    try:
        with site_on(redis_url, queue) as (worker, web, url):
            objects = stream(url, deployment, token, {3: lambda: fail_over(primary, replica, relay, after=8)})  # (longer than a beat's TTL)
            row = RequestLog.objects.filter(deployment=deployment).order_by("queued_at").last()
            assert "error" not in objects[-1], objects[-1]
            assert row.status == RequestLog.Status.OK and len(row.response) > 200
            assert objects[-1]["response"] == row.response
            assert primary["client"].info("replication")["role"] == "slave"  # it did fail over

            short = {"prompt": "What is the capital of France?", "temperature": 0, "max_new_tokens": 16}
            answer = requests.post(f"{url}/api/predict/{deployment.name}", headers={"Authorization": token}, json=short, timeout=60)
            assert answer.status_code == 200, answer.text
            assert "Paris" in answer.json()["response"]

            # And back, with nothing in flight: every connection of the web process is on a
            # replica now, and the request's first write is refused there; it is answered all the same.
            fail_over(replica, primary, relay, after=0)
            answer = requests.post(f"{url}/api/predict/{deployment.name}", headers={"Authorization": token}, json=short, timeout=60)
            assert answer.status_code == 200, answer.text
            assert "Paris" in answer.json()["response"]
            assert worker.alive() and web.alive()
            log = worker.log_path.read_text(errors="replace")  # it failed over as the answer was being written
            assert "Redis is no longer the primary" in log and "Redis is back for appending events" in log
    finally:
        relay.close()


def test_once_a_connection_met_a_failover_every_connection_of_the_process_reconnects(primary_and_replica):
    """Each connection made before a failover would meet it at its next write, which would fail
    (a request's dispatch, a cancel). Once one met it, the others reconnect before their next command."""
    primary, replica = primary_and_replica
    relay = Relay(upstream=primary["port"])
    url = f"redis://127.0.0.1:{relay.port}/0"
    first, second, on_loop = redis.Redis.from_url(url), redis.Redis.from_url(url), aioredis.Redis.from_url(url)
    for client in (first, second, on_loop):
        redis_outage.on_the_primary(client.connection_pool)
    loop = asyncio.new_event_loop()
    try:
        made = primary["client"].info("stats")["total_connections_received"]
        for client in (first, second):
            client.set("before", b"1")
        loop.run_until_complete(on_loop.set("before", b"1"))
        assert primary["client"].info("stats")["total_connections_received"] == made + 3  # one each, not one more for its handshake
        fail_over(primary, replica, relay, after=0)
        with pytest.raises(redis_outage.FailedOver):
            first.set("after", b"first")
        second.set("after", b"second")
        loop.run_until_complete(on_loop.set("after on a loop", b"1"))
        first.set("after", b"first")
        assert replica["client"].mget("after", "after on a loop") == [b"first", b"1"]
    finally:
        loop.run_until_complete(on_loop.aclose())
        loop.close()
        relay.close()


def test_no_worker_is_taken_for_gone_while_its_beats_may_not_reach_the_new_primary(primary_and_replica, settings, stack, user):
    """Until the site's address leads to the new primary, workers' beats go to the old one, which
    refuses them: a process that met a failover lately neither ends a stream for its worker's
    missing beat nor fails the rows of a worker whose beat is missing. For REDIS_OUTAGE_SECONDS
    and a heartbeat's TTL at most, even where the address never leads on (here it stays on the
    old primary), so that a worker that died meanwhile is found so."""
    primary, replica = primary_and_replica
    stuck = redis.Redis.from_url(f"redis://127.0.0.1:{primary['port']}/0")  # as the site's clients: no retries of its own
    redis_outage.on_the_primary(stuck.connection_pool)
    settings.WORKER_HEARTBEAT_TTL, settings.REDIS_OUTAGE_SECONDS = 0, 2  # (a missing beat counts at once)

    def refused() -> None:
        with pytest.raises(redis_outage.FailedOver):
            stuck.set("after", b"1")

    try:
        stuck.set("before", b"1")
        fail_over(primary, replica, None, after=0)
        refused()
        began = time.monotonic()
        worker = name("failing-over")
        row = left_running(user, worker, "a-run")
        assert orphans.fail_orphaned(orphans.Absences()) == [] and asyncio.run(alive(worker))
        while time.monotonic() - began < settings.REDIS_OUTAGE_SECONDS + 0.2:  # refused all along
            refused()
            time.sleep(0.2)
        assert redis_outage.failed_over_lately() is False
        assert str(row.pk) in orphans.fail_orphaned(orphans.Absences()) and not asyncio.run(alive(worker))
    finally:
        stuck.close()


def fail_over(primary: dict, replica: dict, relay: Relay | None, after: float) -> None:
    """Valkey's coordinated failover (writes paused until the replica caught up, then the two swap
    roles); then, `after` seconds later, new connections lead to the new primary, as a DNS name's
    would some time after (its old address lives on in caches for a while)."""
    wait_until(lambda: replica["client"].info("replication").get("master_link_status") == "up", "the replica in sync", 30)
    primary["client"].execute_command("FAILOVER", "TO", "127.0.0.1", replica["port"])
    wait_until(lambda: replica["client"].info("replication")["role"] == "master", "the replica promoted", 30)
    time.sleep(after)
    if relay is not None:
        relay.upstream = ("127.0.0.1", replica["port"])


def test_a_tls_url_keeps_tls_on_every_client(settings):
    """The site's clients (asyncio redis-py's `from_url` lets the URL's class win over one passed
    in) and Celery's broker (its transport, named by its path, is not "rediss" to kombu) keep TLS
    for a `rediss://` URL, and verify the server's certificate as redis-py does."""
    settings.REDIS_URL = url = "rediss://redis.example.invalid:6380/0"

    async def classes() -> list[type]:
        reader = stream_reader.StreamReader(url, events.async_client())
        return [events.async_client().connection_pool.connection_class, reader._conn.connection_pool.connection_class]

    for made in asyncio.run(classes()):
        assert issubclass(made, aioredis.SSLConnection) and made.__name__ == "OnThePrimary"
    script = "import ssl; from workers.celery import app; c = app.connection_for_write(); print(c.ssl['ssl_cert_reqs'] == ssl.CERT_REQUIRED, c.transport.Channel.connection_class_ssl.__mro__[1].__name__)"
    told = subprocess.run([sys.executable, "-c", script], env={**os.environ, "REDIS_URL": url}, capture_output=True, text=True, check=True, cwd=settings.BASE_DIR)
    assert told.stdout.split()[-2:] == ["True", "SSLConnection"], told.stdout
