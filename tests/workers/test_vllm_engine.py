"""The vLLM adapter against a stand-in of exactly the vLLM calls it makes: what the real vLLM tests
(test_vllm_real.py) cannot show, such as the pacing of pieces, and old vLLMs without cache_salt."""

import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace
from typing import TypedDict

import pytest

from llmsite.contract import SamplingParams
from chat.models import Deployment
from workers.engines import base, vllm_setup
from workers.engines.base import GenerationResult, cpu_has_bf16
from tests.workers import fake_vllm


def params(**overrides):
    return SamplingParams(**{"max_new_tokens": 5, "temperature": 0.7, "top_k": 30, "top_p": 0.8, "do_sample": True, **overrides})


def test_engine_args_come_from_the_deployment(fake_vllm_engine):
    (_, args), = [c for c in fake_vllm.calls if c[0] == "from_engine_args"]
    assert args.dtype == ("bfloat16" if cpu_has_bf16() else "float32") and args.max_num_seqs == 8
    assert (Path(args.model) / "config.json").is_file()  # the GGUF reaches vLLM as a safetensors folder
    assert fake_vllm_engine.context_length == 2048


def test_a_cpu_without_bf16_instructions_runs_vllm_in_fp32(monkeypatch):
    monkeypatch.setattr(vllm_setup, "gpu_count", lambda cuda_only=False: 0)
    monkeypatch.setattr(base, "cpu_has_bf16", lambda: False)
    assert vllm_setup.cpu_dtype("bfloat16") == ("float32", "bfloat16 asked, but this CPU has no bf16 instructions: vLLM runs float32")
    assert vllm_setup.cpu_dtype("float16")[0] == "float32" and vllm_setup.cpu_dtype("float32") == ("float32", None)
    monkeypatch.setattr(base, "cpu_has_bf16", lambda: True)
    assert vllm_setup.cpu_dtype("bfloat16") == ("bfloat16", None)
    assert vllm_setup.cpu_dtype("float16") == ("bfloat16", "float16 asked, but this CPU has no fast float16: vLLM runs bfloat16")
    monkeypatch.setattr(vllm_setup, "gpu_count", lambda cuda_only=False: 1)  # a CUDA GPU runs what was asked
    assert vllm_setup.cpu_dtype("float16") == ("float16", None)


def test_the_cache_scope_goes_to_vllm_as_its_cache_salt(fake_vllm_engine):
    list(fake_vllm_engine.stream("p", params(), GenerationResult(), lambda: False, cache_scope="user:7"))
    list(fake_vllm_engine.stream("q", params(), GenerationResult(), lambda: False))
    prompts = [c[1] for c in fake_vllm.calls if c[0] == "generate"]
    assert prompts == [{"prompt": "p", "cache_salt": "user:7"}, "q"]


class OldTextPrompt(TypedDict, total=False):
    prompt: str


def test_a_vllm_without_cache_salt_gets_plain_prompts_and_the_admin_is_told(monkeypatch, django_db_setup, django_db_blocker):
    monkeypatch.setitem(sys.modules, "vllm", fake_vllm)
    monkeypatch.setattr(fake_vllm, "__version__", "0.8.5")
    monkeypatch.setattr(fake_vllm, "TextPrompt", OldTextPrompt)
    fake_vllm.calls.clear()
    from workers.engines.vllm_engine import VLLMEngine

    with django_db_blocker.unblock():
        deployment = Deployment.objects.get(name="default")
    engine = VLLMEngine(deployment)
    list(engine.stream("p", params(), GenerationResult(), lambda: False, cache_scope="user:7"))
    assert [c[1] for c in fake_vllm.calls if c[0] == "generate"] == ["p"]
    assert any("0.8.5 takes no cache_salt" in note and "KV_CACHE_SCOPE" in note for note in engine.load_notes)


def test_the_cache_salt_check_reads_the_prompt_type_then_the_version():
    from workers.engines.vllm_engine import _takes_cache_salt

    assert _takes_cache_salt(fake_vllm)
    assert not _takes_cache_salt(SimpleNamespace(TextPrompt=OldTextPrompt, __version__="0.11.0"))
    assert not _takes_cache_salt(SimpleNamespace(__version__="0.8.5"))
    assert _takes_cache_salt(SimpleNamespace(__version__="0.9.1"))
    assert _takes_cache_salt(SimpleNamespace(__version__="dev"))  # a source build: taken as new


def test_stream_yields_deltas_that_join_to_the_answer_with_usage(fake_vllm_engine):
    result = GenerationResult()
    deltas = list(fake_vllm_engine.stream("prompt", params(), result, lambda: False))
    assert len(deltas) == 5
    assert "".join(deltas) == "Paris is the capital and"
    assert (result.prompt_tokens, result.completion_tokens, result.finish_reason) == (3, 5, "length")


def test_with_an_interval_later_pieces_wait_and_join_to_the_same_answer(fake_vllm_engine):
    result = GenerationResult()
    pieces = list(fake_vllm_engine.stream("prompt", params(), result, lambda: False, interval=600.0))
    assert pieces == ["Paris", " is the capital and"]  # the first at once, the rest at the end
    assert (result.completion_tokens, result.finish_reason) == (5, "length")


def test_natural_end_is_stop(fake_vllm_engine):
    result = GenerationResult()
    "".join(fake_vllm_engine.stream("a natural end", params(max_new_tokens=64), result, lambda: False))
    assert result.finish_reason == "stop" and result.completion_tokens == len(fake_vllm.WORDS)


def test_sampling_settings_map_to_vllm(fake_vllm_engine):
    list(fake_vllm_engine.stream("p", params(seed=7), GenerationResult(), lambda: False))
    list(fake_vllm_engine.stream("p", params(temperature=0, top_k=0), GenerationResult(), lambda: False))
    sampled, greedy = [c[2] for c in fake_vllm.calls if c[0] == "generate"]
    assert (sampled.temperature, sampled.top_k, sampled.top_p, sampled.seed, sampled.max_tokens) == (0.7, 30, 0.8, 7, 5)
    assert (greedy.temperature, greedy.top_k, greedy.top_p) == (0.0, -1, 1.0)


def test_a_cancel_with_text_held_for_the_interval_still_sends_it(fake_vllm_engine):
    result = GenerationResult()
    cancelled = lambda: result.completion_tokens >= 4  # noqa: E731  (Stop pressed with text held back)
    pieces = list(fake_vllm_engine.stream("p", params(max_new_tokens=500), result, cancelled, interval=600.0))
    assert result.finish_reason == "cancelled" and len(pieces) == 2  # the first at once, the held text at the cancel
    assert " ".join(fake_vllm.WORDS).startswith("".join(pieces)) and len("".join(pieces).split()) >= 4


def test_cancel_aborts_the_request_in_vllm(fake_vllm_engine):
    stop = threading.Event()
    result = GenerationResult()
    pieces = []
    for piece in fake_vllm_engine.stream("p", params(max_new_tokens=500), result, stop.is_set):
        pieces.append(piece)
        if len(pieces) == 3:
            stop.set()
    assert result.finish_reason == "cancelled" and len(pieces) < 500
    request_id = [c[3] for c in fake_vllm.calls if c[0] == "generate"][-1]
    assert ("abort", request_id) in fake_vllm.calls


def test_a_consumer_that_stops_reading_aborts_too(fake_vllm_engine):
    stream = fake_vllm_engine.stream("p", params(max_new_tokens=500), GenerationResult(), lambda: False)
    next(stream)
    stream.close()
    time.sleep(0.1)
    assert any(c[0] == "abort" for c in fake_vllm.calls)


def test_a_closed_vllm_engine_finishes_its_answer_then_shuts_down_and_refuses_new_ones(fake_vllm_engine):
    from workers.engines.scheduling import CLOSED

    result = GenerationResult()
    running = threading.Thread(target=lambda: list(fake_vllm_engine.stream("p", params(max_new_tokens=20), result, lambda: False)))
    running.start()
    deadline = time.monotonic() + 60
    while not fake_vllm_engine.scheduler.running:  # the answer is under way in vLLM
        assert time.monotonic() < deadline
        time.sleep(0.01)
    assert fake_vllm_engine.close(60), "it closed once the answer was done"
    running.join(60)
    assert result.finish_reason == "length" and result.completion_tokens == 20
    assert fake_vllm.calls[-1] == ("shutdown",)
    with pytest.raises(RuntimeError, match="changed or disabled") as refused:
        list(fake_vllm_engine.stream("q", params(), GenerationResult(), lambda: False))
    assert str(refused.value) == CLOSED


def test_an_answer_started_before_vllm_has_its_request_holds_off_the_close(fake_vllm_engine):
    """A stream counts from its start, not from when vLLM's front end registers the request: an
    engine closed in between would shut vLLM down under it. Here vLLM's event loop is held busy so
    the started answer's request cannot reach vLLM yet."""
    busy = threading.Event()
    fake_vllm_engine._loop.call_soon_threadsafe(busy.wait, 60)
    result = GenerationResult()
    stream = fake_vllm_engine.stream("p", params(max_new_tokens=5), result, lambda: False)
    running = threading.Thread(target=lambda: list(stream))
    running.start()
    deadline = time.monotonic() + 60
    while not fake_vllm_engine._streams:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    assert fake_vllm_engine.scheduler.running == 0, "vLLM does not have the request yet"
    assert not fake_vllm_engine.close(0.5), "an answer has started: the engine stays open"
    assert ("shutdown",) not in fake_vllm.calls
    busy.set()
    running.join(60)
    assert result.finish_reason == "length" and result.completion_tokens == 5
    assert fake_vllm_engine.close(60) and fake_vllm.calls[-1] == ("shutdown",)
