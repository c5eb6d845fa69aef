"""The web process's readers of event streams share one Redis read (chat.stream_reader): any number
of concurrent streams, each reader handed only the events after its own last id, a bounded batch
at a time; a reader that starts while the shared read waits is not held up by it, one that starts
behind another misses nothing, and an id Redis would refuse fails only its own reader.

These run the readers in this process's event loop against the suite's real Redis; a worker's
events are published as a worker publishes them (events.publish).
"""

import asyncio
import threading
import uuid

from chat import events, stream_reader
from llmsite import contract


def final(count: int) -> contract.Final:
    return contract.Final(text="", finish_reason="length", usage={"prompt_tokens": 1, "completion_tokens": count})


def xread_calls() -> int:
    return events.sync_client().info("commandstats").get("cmdstat_xread", {}).get("calls", 0)


def test_a_reader_that_comes_late_to_a_long_answer_takes_it_a_bounded_batch_at_a_time():
    """A second tab, a resume, or a web process that fell behind under load reads a stream that
    already holds the whole answer: it gets every event, in order, without holding all of them at once."""
    request_id, count = str(uuid.uuid4()), 5 * stream_reader.READ_BATCH
    for n in range(count):
        events.publish(request_id, contract.Delta(f"{n} "))
    events.publish(request_id, final(count))

    class Recording(events.Subscription):
        batches: list[int] = []

        async def _read(self, wait):
            found = await super()._read(wait)
            self.batches.append(len(found))
            return found

    async def read():
        return [event async for event in Recording(request_id).events(timeout=60)]

    read_events = asyncio.run(read())
    assert "".join(e.text for e in read_events[:-1]) == "".join(f"{n} " for n in range(count))
    assert isinstance(read_events[-1], contract.Final)
    assert max(Recording.batches) <= stream_reader.READ_BATCH, f"one read took {max(Recording.batches)} events"


def test_three_hundred_concurrent_streams_in_one_process_each_get_their_own_answer():
    """Each reader once held a pooled connection in its own blocking read, and redis-py's pool
    holds 100: the 101st concurrent stream failed at once with "Too many connections". Now their
    reads are shared: ten events or more per XREAD on average."""
    streams, count = [str(uuid.uuid4()) for _ in range(300)], 20

    def publish():
        for n in range(count):
            for request_id in streams:
                events.publish(request_id, contract.Delta(f"{request_id[:4]}{n} "))
        for request_id in streams:
            events.publish(request_id, final(count))

    async def read(request_id):
        subscription = await events.Subscription(request_id, listen=True).open()
        return [event async for event in subscription.events(timeout=60)]

    async def everyone():
        readers = [asyncio.create_task(read(request_id)) for request_id in streams]
        await asyncio.sleep(0.5)  # every reader is waiting before the first event
        publisher = threading.Thread(target=publish)
        publisher.start()
        try:
            return await asyncio.gather(*readers, return_exceptions=True)
        finally:
            await asyncio.to_thread(publisher.join)

    reads_before = xread_calls()
    answers = asyncio.run(everyone())
    reads = xread_calls() - reads_before
    failed = [repr(a) for a in answers if isinstance(a, BaseException)]
    assert not failed, f"{len(failed)} of {len(streams)} streams failed, the first: {failed[0]}"
    for request_id, answer in zip(streams, answers):
        assert "".join(e.text for e in answer[:-1]) == "".join(f"{request_id[:4]}{n} " for n in range(count))
        assert isinstance(answer[-1], contract.Final)
    # One read per event or more each, before; 210-233 reads here, 192 on a busy machine.
    events_sent = len(streams) * (count + 1)
    assert reads < events_sent / 10, f"{reads} XREADs for {events_sent} events of {len(streams)} streams: the readers did not share them"


def test_two_readers_of_one_stream_at_different_places_each_get_what_follows_their_place():
    request_id = str(uuid.uuid4())
    for n in range(10):
        events.publish(request_id, contract.Delta(f"{n} "))
    events.publish(request_id, final(10))

    async def both():
        first = events.Subscription(request_id)
        ids = [first.last_id]
        async for _ in first.events(timeout=30):
            ids.append(first.last_id)
        # A second tab from the start, and a resume after the seventh delta, at once.
        return await asyncio.gather(*(collect(events.Subscription(request_id, after=ids[start])) for start in (0, 7)))

    async def collect(subscription):
        return [event async for event in subscription.events(timeout=30)]

    whole, resumed = asyncio.run(both())
    assert "".join(e.text for e in whole[:-1]) == "".join(f"{n} " for n in range(10))
    assert "".join(e.text for e in resumed[:-1]) == "7 8 9 "
    assert isinstance(whole[-1], contract.Final) and isinstance(resumed[-1], contract.Final)


def test_a_reader_that_starts_while_the_shared_read_waits_is_not_held_up_by_it(monkeypatch):
    """The shared read waits up to BLOCK_MS (4 s here) for any of its streams; a reader that starts
    meanwhile wakes it, so its events come within its own, shorter, wait."""
    monkeypatch.setattr(stream_reader, "BLOCK_MS", 4000)
    quiet, ready = str(uuid.uuid4()), str(uuid.uuid4())
    events.publish(ready, contract.Delta("here"))

    async def run():
        shared = stream_reader.reader(events.async_client())
        waiting = asyncio.create_task(shared.read(events.channel(quiet), "0", timeout=10))
        await asyncio.sleep(0.5)  # the shared read now blocks on the quiet stream
        got = await shared.read(events.channel(ready), "0", timeout=2)
        waiting.cancel()
        return got

    got = asyncio.run(run())
    assert [contract.decode(fields[b"e"]) for _, fields in got] == [contract.Delta("here")]


def test_a_reader_that_starts_behind_another_on_a_live_stream_misses_nothing():
    """A second tab (or a resume) starts from the stream's beginning while the first reader waits
    at its tail: when the wait at the tail returns a new event, the newcomer still gets the answer
    from its beginning, not from that event on."""
    request_id = str(uuid.uuid4())
    key = events.channel(request_id)
    for n in range(5):
        events.publish(request_id, contract.Delta(f"{n} "))

    async def run():
        shared = stream_reader.reader(events.async_client())
        tail = events.sync_client().xrevrange(key, count=1)[0][0].decode()
        first = asyncio.create_task(shared.read(key, tail, timeout=10))
        await asyncio.sleep(0.5)  # the shared read now waits at the tail
        events.publish(request_id, contract.Delta("5 "))  # its answer is on its way while the newcomer starts
        newcomer = asyncio.create_task(shared.read(key, "0", timeout=10))
        return await first, await newcomer

    first, newcomer = asyncio.run(run())
    assert [contract.decode(fields[b"e"]).text for _, fields in first] == ["5 "]
    texts = [contract.decode(fields[b"e"]).text for _, fields in newcomer]
    assert texts[:5] == ["0 ", "1 ", "2 ", "3 ", "4 "], f"the newcomer's first read began at {texts[:1]}"


def test_an_id_that_redis_would_refuse_fails_only_its_own_reader():
    """Ids come from clients (Last-Event-ID, the chat socket's last_event): one that Redis refuses must
    be refused before it reaches the read that all of the process's readers share."""
    good = str(uuid.uuid4())
    events.publish(good, contract.Delta("here"))
    bad_ids = ["0--1", "1_0", "5 ", "-1", str(2**64), f"1-{2**64}", "1-2-3", ""]
    assert not [value for value in bad_ids if events.valid_event_id(value)]
    assert all(events.valid_event_id(value) for value in ["0", "0-0", "1700000000000-3", str(2**64 - 1)])

    async def run():
        shared = stream_reader.reader(events.async_client())
        refused = []
        for value in bad_ids:
            try:
                await shared.read(events.channel(good), value, timeout=2)
            except ValueError:
                refused.append(value)
        return refused, await shared.read(events.channel(good), "0", timeout=5)

    refused, got = asyncio.run(run())
    assert refused == bad_ids
    assert [contract.decode(fields[b"e"]) for _, fields in got] == [contract.Delta("here")]
