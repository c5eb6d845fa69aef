"""How QueuedEngine.stream paces text (STREAM_INTERVAL_MS): the first text at once, later text held
for the interval, the last piece at once, and nothing held back lost on a cancel or a failure.
A stand-in scheduler hands out tokens when the test says so, so no outcome depends on timing."""

import queue
import threading

import pytest

from llmsite.contract import SamplingParams
from workers.engines.base import GenerationResult
from workers.engines.queued import QueuedEngine

WORDS = ["The", " capital", " of", " France", " is", " Paris", "."]
LONG = 600.0  # an interval no test waits out: held text must go for another reason


class Tokenizer:
    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [0, 1, 2]}

    def decode(self, ids, skip_special_tokens=True):
        return "".join(WORDS[i] for i in ids)


class Scheduler:
    """Puts what the test feeds on the request's queue; an abort ends the request as cancelled."""

    def __init__(self):
        self.request = None
        self.submitted = threading.Event()

    def submit(self, request):
        self.request = request
        self.submitted.set()

    def feed(self, *items):
        self.submitted.wait(10)
        for item in items:
            self.request.out.put(item)

    def abort(self, request_id):
        self.request.out.put(("done", "cancelled"))


class Engine(QueuedEngine):
    def __init__(self):
        self.tokenizer, self.context_length, self.scheduler = Tokenizer(), None, Scheduler()


class Reader:
    """Reads the stream in a thread; `next_piece` waits (boundedly) for the next piece."""

    def __init__(self, engine, cancelled=lambda: False, **pacing):
        self.result, self.pieces, self.error = GenerationResult(), queue.Queue(), None
        params = SamplingParams(max_new_tokens=16, temperature=0, top_k=0, top_p=1.0, do_sample=False)
        stream = engine.stream("prompt", params, self.result, cancelled, **pacing)
        self.thread = threading.Thread(target=self._read, args=(stream,), daemon=True)
        self.thread.start()

    def _read(self, stream):
        try:
            for piece in stream:
                self.pieces.put(piece)
        except RuntimeError as exc:
            self.error = exc
        self.pieces.put(None)

    def next_piece(self, timeout=10):
        return self.pieces.get(timeout=timeout)

    def rest(self):
        out = []
        while (piece := self.next_piece()) is not None:
            out.append(piece)
        return out


def tokens(*ids):
    return [("token", i) for i in ids]


def test_the_first_text_goes_at_once_and_later_text_waits_for_the_end():
    engine = Engine()
    reader = Reader(engine, interval=LONG)
    engine.scheduler.feed(*tokens(0))
    assert reader.next_piece() == "The"
    engine.scheduler.feed(*tokens(1, 2, 3))
    with pytest.raises(queue.Empty):
        reader.next_piece(timeout=0.5)  # held for the interval
    engine.scheduler.feed(*tokens(4, 5), ("done", "stop"))
    assert reader.rest() == [" capital of France is Paris"]  # the end lets it go at once
    assert (reader.result.finish_reason, reader.result.completion_tokens) == ("stop", 7)  # and the end-of-turn token


def test_text_goes_at_once_until_eager_chars_went():
    engine = Engine()
    reader = Reader(engine, interval=LONG, eager_chars=len("The capital"))
    engine.scheduler.feed(*tokens(0))
    assert reader.next_piece() == "The"
    engine.scheduler.feed(*tokens(1))
    assert reader.next_piece() == " capital"  # the caller could not show anything yet
    engine.scheduler.feed(*tokens(2))
    with pytest.raises(queue.Empty):
        reader.next_piece(timeout=0.5)
    engine.scheduler.feed(("done", "length"))
    assert reader.rest() == [" of"]


def test_held_text_goes_before_a_failure_is_raised():
    engine = Engine()
    reader = Reader(engine, interval=LONG)
    engine.scheduler.feed(*tokens(0))
    assert reader.next_piece() == "The"
    engine.scheduler.feed(*tokens(1, 2), ("error", "the engine broke"))
    assert reader.rest() == [" capital of"]
    assert "the engine broke" in str(reader.error)


def test_held_text_goes_when_the_request_is_cancelled():
    engine, stop = Engine(), threading.Event()
    reader = Reader(engine, cancelled=stop.is_set, interval=LONG)
    engine.scheduler.feed(*tokens(0))
    assert reader.next_piece() == "The"
    engine.scheduler.feed(*tokens(1))
    stop.set()  # Stop pressed: the next cancel check aborts; the scheduler ends the request
    assert reader.rest() == [" capital"]
    assert reader.result.finish_reason == "cancelled"


def test_without_an_interval_every_piece_goes_when_it_comes():
    engine = Engine()
    reader = Reader(engine)
    for i in range(3):
        engine.scheduler.feed(*tokens(i))
        assert reader.next_piece() == WORDS[i]
    engine.scheduler.feed(("done", "length"))
    assert reader.rest() == []
