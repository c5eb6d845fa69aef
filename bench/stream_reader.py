"""The web tier's readers of event streams: one shared Redis read for all of a process's readers
(chat.stream_reader) against a blocking XREAD per reader (what the web tier did before), measured
in one run.

At each count of concurrent streams a publisher process appends a delta to every stream every
50 ms (20 tokens/s per stream), one event at a time as workers publish them (`events.publish`),
and each stream's reader, in this process's event loop, reads it to its final event.
Reported per side: the streams that ended whole, the median and 99th-percentile time from an
event's publish to its reader, the event loop's CPU and Redis's CPU per 1000 events, and the
Redis clients open meanwhile. The per-reader read holds one of redis-py's pooled connections
(100) per waiting reader, so it fails past 100 streams. `make bench-streams`; writes
bench/results/stream_reader.json. `make bench-linger` (`stream_reader.py linger`) measures the
shared read alone at several lingers, with its XREADs per 1000 events; writes
bench/results/stream_linger.json.
"""

import asyncio
import json
import os
import statistics
import subprocess
import sys
import time
import uuid
from pathlib import Path

BASE_DIR = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(BASE_DIR))
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "llmsite.settings")

import django  # noqa: E402

django.setup()

import redis.asyncio as aioredis  # noqa: E402
from django.conf import settings  # noqa: E402

from chat import events, stream_reader  # noqa: E402
from llmsite import contract  # noqa: E402

STREAMS = [1, 32, 96, 400]
EVENTS = int(os.environ.get("BENCH_STREAM_EVENTS", "100"))
TICK = 0.05


class PerReader(events.Subscription):
    """The read before chat.stream_reader: each reader blocks in an XREAD of its own."""

    clients: dict = {}

    async def _read(self, wait: float) -> list:
        loop = id(asyncio.get_running_loop())
        client = PerReader.clients.setdefault(loop, aioredis.Redis.from_url(settings.REDIS_URL))
        block = max(1, int(min(wait, 1.0) * 1000))
        found = await client.xread({events.channel(self.request_id): self.last_id}, count=stream_reader.READ_BATCH, block=block)
        return found[0][1] if found else []


def publish(streams: list[str]) -> None:
    """The publisher process: the streams' events, then the Redis clients seen halfway (on stdout)."""
    redis, clients = events.sync_client(), None
    next_tick = time.monotonic()
    for n in range(EVENTS):
        for request_id in streams:
            events.publish(request_id, contract.Delta(f"{time.time()!r} "))
        if n == EVENTS // 2:
            clients = redis.info("clients")["connected_clients"] - 1  # less this publisher's
        next_tick += TICK
        time.sleep(max(0.0, next_tick - time.monotonic()))
    for request_id in streams:
        events.publish(request_id, contract.Final(text="", finish_reason="length"))
    print(clients)


def start_publisher(streams: list[str]) -> subprocess.Popen:
    child = subprocess.Popen([sys.executable, __file__, "publish"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    child.stdin.write("\n".join(streams))
    child.stdin.close()
    return child


async def read(subscription, delays: list) -> int:
    got = 0
    async for event in subscription.events(timeout=30):
        if isinstance(event, contract.Delta):
            delays.append(time.time() - float(event.text))
            got += 1
    return got


async def close_clients() -> None:
    """This loop's pooled connections, so that the next count's Redis clients are its own (the
    shared reader closes its own as the loop ends)."""
    loop = asyncio.get_running_loop()
    if (mine := PerReader.clients.pop(id(loop), None)) is not None:
        await mine.aclose()
    await events.async_client().connection_pool.disconnect()
    events._async_clients.pop(loop, None)


def redis_cpu() -> float:
    info = events.sync_client().info("cpu")
    return info["used_cpu_user"] + info["used_cpu_sys"]


def xread_calls() -> int:
    return events.sync_client().info("commandstats").get("cmdstat_xread", {}).get("calls", 0)


def run(kind, count: int) -> dict:
    streams = [str(uuid.uuid4()) for _ in range(count)]
    delays = []

    async def everyone():
        readers = [asyncio.create_task(read(kind(request_id), delays)) for request_id in streams]
        await asyncio.sleep(0.5)  # every reader waits before the first event
        cpu, redis_before, reads_before = time.thread_time(), redis_cpu(), xread_calls()
        publisher = start_publisher(streams)
        results = await asyncio.gather(*readers, return_exceptions=True)
        clients = (await asyncio.to_thread(publisher.stdout.read)).strip()
        measured = results, time.thread_time() - cpu, redis_cpu() - redis_before, clients, xread_calls() - reads_before
        await close_clients()
        return measured

    results, loop_cpu, redis_seconds, clients, reads = asyncio.run(everyone())
    whole = sum(1 for r in results if r == EVENTS)
    errors = sorted({type(r).__name__ for r in results if isinstance(r, BaseException)})
    delays.sort()
    delivered = max(1, len(delays))
    return {
        "streams": count,
        "whole": whole,
        "errors": errors,
        "median_ms": round(statistics.median(delays) * 1000, 2) if delays else None,
        "p99_ms": round(delays[int(len(delays) * 0.99) - 1] * 1000, 2) if delays else None,
        "loop_cpu_ms_per_1000": round(loop_cpu * 1e6 / delivered, 1),
        "redis_cpu_ms_per_1000": round(redis_seconds * 1e6 / delivered, 1),
        "redis_clients": int(clients) if clients.isdigit() else None,
        "xreads_per_1000": round(reads * 1000 / delivered, 1),
    }


LINGERS_US = [0, 2.5, 5, 10, 20, 40]  # per waiting reader; at most LINGER_MAX_SECONDS in all


def linger_sweep() -> None:
    """The shared read's linger before each XREAD (`stream_reader.LINGER_PER_READER_SECONDS`)
    against the reads it saves and the latency it adds, in one run; writes stream_linger.json."""
    chosen, rows = stream_reader.LINGER_PER_READER_SECONDS, []
    for count in STREAMS[1:]:
        for micros in LINGERS_US:
            stream_reader.LINGER_PER_READER_SECONDS = micros * 1e-6
            row = {"linger_us": micros, **run(events.Subscription, count)}
            rows.append(row)
            print(json.dumps(row), flush=True)
    stream_reader.LINGER_PER_READER_SECONDS = chosen
    print(f"\n{EVENTS} events per stream, one every {TICK * 1000:.0f} ms; the linger is capped at "
          f"{stream_reader.LINGER_MAX_SECONDS * 1000:g} ms; the site's is {chosen * 1e6:g} us a reader\n")
    print("| streams | linger us / reader | ended whole | XREADs / 1000 events | median ms | p99 ms | loop CPU ms / 1000 events | Redis CPU ms / 1000 events |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['streams']} | {r['linger_us']:g} | {r['whole']} of {r['streams']} | {r['xreads_per_1000']} | {r['median_ms']} | {r['p99_ms']} | {r['loop_cpu_ms_per_1000']} | {r['redis_cpu_ms_per_1000']} |")
    out = BASE_DIR / "bench" / "results" / "stream_linger.json"
    out.write_text(json.dumps({"events_per_stream": EVENTS, "tick_seconds": TICK, "rows": rows}, indent=2) + "\n")
    print(f"\nwrote {out.relative_to(BASE_DIR)}")


def main() -> None:
    rows = []
    for count in STREAMS:
        for name, kind in (("per reader", PerReader), ("shared", events.Subscription)):
            row = {"read": name, **run(kind, count)}
            rows.append(row)
            print(json.dumps(row), flush=True)
    print(f"\n{EVENTS} events per stream, one every {TICK * 1000:.0f} ms; times from publish to reader\n")
    print("| streams | read | ended whole | median ms | p99 ms | loop CPU ms / 1000 events | Redis CPU ms / 1000 events | Redis clients |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        whole = f"{r['whole']} of {r['streams']}" + (f" ({', '.join(r['errors'])})" if r["errors"] else "")
        print(f"| {r['streams']} | {r['read']} | {whole} | {r['median_ms']} | {r['p99_ms']} | {r['loop_cpu_ms_per_1000']} | {r['redis_cpu_ms_per_1000']} | {r['redis_clients']} |")
    print("\n| streams | median, shared ÷ per reader | p99 | loop CPU | Redis CPU |")
    print("|---|---|---|---|---|")
    for count in STREAMS:
        per, shared = (next(r for r in rows if r["streams"] == count and r["read"] == kind) for kind in ("per reader", "shared"))
        ratios = [shared[f] / per[f] if per[f] else float("nan") for f in ("median_ms", "p99_ms", "loop_cpu_ms_per_1000", "redis_cpu_ms_per_1000")]
        note = f" (per reader: {per['whole']} of {count} ended)" if per["whole"] < count else ""
        print(f"| {count}{note} | " + " | ".join(f"{r:.2f}" for r in ratios) + " |")
    out = BASE_DIR / "bench" / "results" / "stream_reader.json"
    out.write_text(json.dumps({"events_per_stream": EVENTS, "tick_seconds": TICK, "rows": rows}, indent=2) + "\n")
    print(f"\nwrote {out.relative_to(BASE_DIR)}")


if __name__ == "__main__":
    if sys.argv[1:] == ["publish"]:
        publish(sys.stdin.read().split())
    elif sys.argv[1:] == ["linger"]:
        linger_sweep()
    else:
        main()
