"""The transformers engine's slot decoding (workers/engines/slots.py) on CPU: the eager path the
CPU runs, the bucketed static-buffer path a GPU captures as CUDA graphs (emulated here: the same
buffers and buckets, replayed without capturing), the fallback to the padded cache, and the
batched sampler (`sample_rows`)."""

import gc
import weakref
from collections import Counter

import pytest
import torch

from chat.models import Deployment
from llmsite.contract import SamplingParams
from tests.workers.test_batching import QUESTIONS, ask, ask_all, greedy
from workers.engines.batch_sampling import sample_rows, start_sampling
from workers.engines.batching import BatchingScheduler, BatchRequest
from workers.engines.slot_cache import SlotCache
from workers.engines.slots import BATCH_BUCKETS, batch_bucket, width_bucket
from workers.engines.step_setup import slot_support


def _engine(monkeypatch_env: dict, django_db_blocker):
    from workers.engines.transformers_engine import TransformersEngine

    with pytest.MonkeyPatch.context() as patch:
        for name, value in monkeypatch_env.items():
            patch.setenv(name, value)
        with django_db_blocker.unblock():
            deployment = Deployment.objects.get(name="default")
        return TransformersEngine(deployment)


@pytest.fixture(scope="module")
def engines(django_db_setup, django_db_blocker):
    """The default model three ways: slots as the CPU runs them, slots over static buffers and
    buckets as a GPU runs them (capture emulated), and the padded cache (slots off)."""
    made = {
        "eager": _engine({}, django_db_blocker),
        "static": _engine({"LLMSITE_CUDA_GRAPHS": "emulate"}, django_db_blocker),
        "padded": _engine({"LLMSITE_SLOTS": "0"}, django_db_blocker),
    }
    yield made
    for engine in made.values():
        engine.scheduler.stop()


def test_the_default_model_decodes_on_slots_on_a_cpu_without_graphs(engines):
    eager = engines["eager"]
    assert eager.scheduler.decode_mode == "slots"
    assert eager.scheduler.decoder.graphs is False
    assert "decode steps: slots" in eager.load_notes
    assert engines["static"].scheduler.decode_mode == "slots, static buffers (CUDA graphs emulated), one step ahead"
    assert engines["padded"].scheduler.decode_mode == "padded cache (LLMSITE_SLOTS=0)"


def test_sixteen_batched_greedy_answers_are_the_same_on_slots_static_buffers_and_the_padded_cache(engines):
    # Prompts of different lengths join at different times: each row writes at its own column.
    questions = [q + " Answer in one sentence." * (i % 4) for i, q in enumerate(QUESTIONS)]
    reference = [ask(engines["padded"], q, greedy(20))[0] for q in questions]
    for kind in ("eager", "static"):
        batched = ask_all(engines[kind], questions, greedy(20))
        assert [text for text, _ in batched] == reference, kind


def test_the_static_path_captures_per_bucket_not_per_sequence_length(engines):
    decoder = engines["static"].scheduler.decoder
    ask(engines["static"], "warm up", greedy(4))
    before = decoder.captures
    lengths = set()
    for i in range(8):  # eight prompt lengths, one stream, all within the first width bucket
        question = "What is the capital of France?" + " Please." * i
        text, result = ask(engines["static"], question, greedy(6))
        lengths.add(result.prompt_tokens)
    assert len(lengths) == 8
    assert decoder.captures == before, "a new sequence length captured a new step"


def test_an_aborted_request_on_the_static_path_frees_its_row_and_the_others_finish(engines):
    from tests.workers import test_batching  # the padded cache's checks, on static buffers

    test_batching.test_an_aborted_request_frees_its_slot_and_the_others_finish(engines["static"])
    test_batching.test_aborting_one_of_sixteen_streams_leaves_the_other_fifteen_whole(engines["static"])
    assert engines["static"].scheduler._batch.requests == []


def test_an_idle_cpu_engine_gives_its_slot_buffers_back(engines):
    import time

    cache = engines["eager"].scheduler.decoder.cache
    ask_all(engines["eager"], QUESTIONS[:3], greedy(4))
    deadline = time.monotonic() + 10  # the engine thread compacts just after the last "done"
    while cache.rows and time.monotonic() < deadline:
        time.sleep(0.02)
    assert cache.rows == 0 and cache.keys == []
    static = engines["static"].scheduler.decoder.cache
    assert static.rows > 0, "the static path keeps its buffers (graphs hold their addresses)"


def test_seeded_sampling_is_the_same_alone_and_beside_other_rows_on_slots(engines):
    params = SamplingParams(max_new_tokens=12, temperature=0.9, top_k=30, top_p=0.9, do_sample=True, seed=7)
    alone = ask(engines["eager"], "Write a short poem about rain.", params)[0]
    beside = ask_all(engines["static"], ["Write a short poem about rain."] + QUESTIONS[:3], [params] + [greedy(12)] * 3)
    assert beside[0][0] == alone


# --- which models decode on slots ---------------------------------------------------------------


def _tiny(architecture: str, **extra):
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(
        architecture, vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, **extra,
    )
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config).eval()


def test_a_sliding_window_keeps_the_padded_cache_and_says_why():
    scheduler = BatchingScheduler(_tiny("mistral", sliding_window=8), max_batch_size=4)
    try:
        assert scheduler.decode_mode == "padded cache (a sliding window of 8)"
    finally:
        scheduler.stop()
    assert slot_support(_tiny("mistral", sliding_window=None)) is None


def test_modelling_code_shipped_with_the_model_keeps_the_padded_cache():
    from transformers import LlamaForCausalLM

    class Shipped(LlamaForCausalLM):  # defined outside transformers, as remote code is
        pass

    model = Shipped(_tiny("llama").config).eval()
    assert slot_support(model) == "its modelling code ships with the model"


def test_a_slot_step_that_disagrees_with_the_plain_forward_is_not_used(monkeypatch):
    # A cache that writes each new key one column too far: the load-time check must catch it.
    original = SlotCache.bind
    monkeypatch.setattr(SlotCache, "bind", lambda self, rows, at, mask: original(self, rows, at + 1, mask))
    scheduler = BatchingScheduler(_tiny("llama"), max_batch_size=4)
    try:
        assert scheduler.decoder is None
        assert scheduler.decode_mode.startswith("padded cache (the slot step's logits differ from the plain forward's by")
    finally:
        scheduler.stop()


def test_tiny_llama_and_qwen2_greedy_on_slots_equal_transformers_generate():
    for architecture in ("llama", "qwen2"):
        model = _tiny(architecture)
        scheduler = BatchingScheduler(model, max_batch_size=4)
        assert scheduler.decode_mode == "slots", architecture
        prompts = [[5, 6, 7], [9, 8, 7, 6, 5, 4, 3], [11] * 12]
        requests = [BatchRequest(id=str(i), prompt_ids=p, max_new_tokens=10, greedy=True) for i, p in enumerate(prompts)]
        for request in requests:
            scheduler.submit(request)
        got = [_tokens(request) for request in requests]
        scheduler.stop()
        for prompt, tokens in zip(prompts, got):
            assert tokens == _greedy_without_cache(model, prompt, 10), architecture


def _greedy_without_cache(model, prompt: list[int], count: int) -> list[int]:
    """The reference: each token from a full forward over the whole sequence (no cache at all)."""
    sequence = list(prompt)
    with torch.inference_mode():
        for _ in range(count):
            sequence.append(int(model(input_ids=torch.tensor([sequence]), use_cache=False).logits[0, -1].argmax()))
    return sequence[len(prompt):]


def _tokens(request: BatchRequest) -> list[int]:
    tokens = []
    while True:
        kind, value = request.out.get(timeout=60)
        if kind != "token":
            return tokens
        tokens.append(value)


def _ask_one(scheduler: BatchingScheduler, prompt: list[int], new_tokens: int) -> list[int]:
    """One greedy request's tokens, alone in the engine."""
    request = BatchRequest(id=f"one-{len(prompt)}", prompt_ids=prompt, max_new_tokens=new_tokens, greedy=True)
    scheduler.submit(request)
    return _tokens(request)


# --- the static path: buckets captured at load, one step ahead --------------------------------


def _static(monkeypatch, ahead: bool, max_batch_size=8) -> BatchingScheduler:
    monkeypatch.setenv("LLMSITE_CUDA_GRAPHS", "emulate")
    monkeypatch.setenv("LLMSITE_DECODE_AHEAD", "1" if ahead else "0")
    return BatchingScheduler(_tiny("llama"), max_batch_size=max_batch_size)


def test_every_batch_bucket_is_captured_at_load_and_none_while_serving(monkeypatch):
    scheduler = _static(monkeypatch, ahead=True)
    try:
        decoder = scheduler.decoder
        assert scheduler.decode_mode == "slots, static buffers (CUDA graphs emulated), one step ahead"
        assert sorted(size for size, _, _ in decoder._graphs) == [1, 2, 4, 8]
        assert decoder.captures == 4, "the load check's capture was thrown away and made again"
        assert decoder.cache.rows == 8, "the buffers are as tall as the batch from the start"
        assert decoder.capture_failures == 0 and decoder.graphs == "emulate"
        before = decoder.captures
        for streams in (1, 3, 8, 5):
            requests = [BatchRequest(id=f"{streams}-{i}", prompt_ids=[3 + i] * (4 + i), max_new_tokens=6, greedy=True) for i in range(streams)]
            for request in requests:
                scheduler.submit(request)
            assert all(len(_tokens(r)) == 6 for r in requests)
        assert decoder.captures == before
    finally:
        scheduler.stop()


def test_a_stream_that_outgrows_the_first_width_keeps_the_rows_that_fit_in_the_same_bytes(monkeypatch):
    # Warm-up made the buffers 8 rows tall; when the columns double, 4 rows fit in the bytes they
    # had (not 8: at 8k columns every idle row as wide would hold gigabytes on a 1B model).
    scheduler = _static(monkeypatch, ahead=True)
    try:
        decoder = scheduler.decoder
        assert (decoder.cache.rows, decoder.cache.columns) == (8, 256)
        prompt = [(3 * i + 1) % 300 for i in range(250)]
        assert _ask_one(scheduler, prompt, 12) == _greedy_without_cache(_tiny("llama"), prompt, 12)
        assert (decoder.cache.rows, decoder.cache.columns) == (4, 512)
        assert decoder.capture_failures == 0
    finally:
        scheduler.stop()


def test_the_step_ahead_of_a_rows_last_token_does_not_widen_the_buffers(monkeypatch):
    # 245 + 12 = 257: the last useful step reads 256 columns; the step launched ahead of the last
    # token would read 257 and double the width for a row that is already done.
    scheduler = _static(monkeypatch, ahead=True)
    try:
        decoder = scheduler.decoder
        before = decoder.captures
        prompt = [(5 * i + 2) % 300 for i in range(245)]
        assert _ask_one(scheduler, prompt, 12) == _greedy_without_cache(_tiny("llama"), prompt, 12)
        assert decoder.cache.columns == 256 and decoder.captures == before
    finally:
        scheduler.stop()


def test_a_long_prompt_joining_running_streams_widens_the_buffers_and_every_answer_holds(monkeypatch):
    # The long prompt is prefilled in chunks while three streams decode, joins in row 3, and its
    # widening keeps only the rows in use: the others' keys must survive the move.
    model = _tiny("llama")
    prompts = [[5, 6, 7], [9, 8, 7, 6, 5], [11] * 12, [(7 * i + 1) % 300 for i in range(300)]]
    plan = [{"prompt": p, "new": 24} for p in prompts]
    scheduler = _static(monkeypatch, ahead=True)
    try:
        requests = [BatchRequest(id=str(i), prompt_ids=item["prompt"], max_new_tokens=item["new"], greedy=True) for i, item in enumerate(plan)]
        for request in requests[:3]:
            scheduler.submit(request)
        firsts = [request.out.get(timeout=60)[1] for request in requests[:3]]
        scheduler.submit(requests[3])
        answers = [[first] + _tokens(r) for first, r in zip(firsts, requests[:3])] + [_tokens(requests[3])]
        assert (scheduler.decoder.cache.columns, scheduler.decoder.cache.rows) == (512, 4)
    finally:
        scheduler.stop()
    assert answers == [_greedy_without_cache(model, p, 24) for p in prompts]


def test_a_failed_capture_stops_the_captures_and_the_engine_decodes_eagerly(monkeypatch):
    from workers.engines import slots

    step = slots.SlotDecoder._static_step

    def failing(self, rows, columns, model=None):
        if rows == 2:
            raise RuntimeError("operation not permitted when stream is capturing")
        return step(self, rows, columns, model)

    monkeypatch.setattr(slots.SlotDecoder, "_static_step", failing)
    scheduler = _static(monkeypatch, ahead=True)
    try:
        decoder = scheduler.decoder
        assert (decoder.captures, decoder.capture_failures, decoder.graphs) == (2, 1, False), "warm went on after a failure"
        assert scheduler.decode_mode == "slots"
        requests = [BatchRequest(id=str(i), prompt_ids=[3 + i] * 5, max_new_tokens=6, greedy=True) for i in range(3)]
        for request in requests:
            scheduler.submit(request)
        assert [_tokens(r) for r in requests] == [_greedy_without_cache(_tiny("llama"), [3 + i] * 5, 6) for i in range(3)]
        assert decoder.captures == 2
    finally:
        scheduler.stop()


# --- the static step compiled by torch.compile (LLMSITE_COMPILE=1) ------------------------------


def test_the_compiled_step_compiles_at_load_only_and_answers_as_the_uncompiled_model(monkeypatch):
    # Inductor compiles on CPU too. Streams join and leave, a long prompt widens the buffers to
    # 512 columns, then short ones read 256 of them: one graph serves every batch bucket and
    # width (two compiled at load where torch tells buffers as wide as the step reads from
    # wider ones), none later: after load a compile would raise and the plain step take over.
    monkeypatch.setenv("LLMSITE_COMPILE", "1")
    model = _tiny("llama")
    prompts = [[5, 6, 7], [9, 8, 7, 6, 5], [11] * 12, [(7 * i + 1) % 300 for i in range(300)]]
    shorts = [[3 + i] * (4 + i) for i in range(8)]
    scheduler = _static(monkeypatch, ahead=True)
    try:
        decoder = scheduler.decoder
        assert scheduler.decode_mode == "slots, static buffers (CUDA graphs emulated), compiled, one step ahead"
        at_load = decoder.compiled.compiles
        assert 1 <= at_load <= 2 and decoder.compiled.frozen
        assert sorted(size for size, _, _ in decoder._graphs) == [2, 4, 8], "one stream runs in the bucket of two"
        requests = [BatchRequest(id=str(i), prompt_ids=p, max_new_tokens=24, greedy=True) for i, p in enumerate(prompts)]
        for request in requests[:3]:
            scheduler.submit(request)
        firsts = [request.out.get(timeout=120)[1] for request in requests[:3]]
        scheduler.submit(requests[3])
        answers = [[first] + _tokens(r) for first, r in zip(firsts, requests[:3])] + [_tokens(requests[3])]
        assert (decoder.cache.columns, decoder.cache.rows) == (512, 4)
        later = [BatchRequest(id=f"s{i}", prompt_ids=p, max_new_tokens=6, greedy=True) for i, p in enumerate(shorts)]
        for request in later:
            scheduler.submit(request)
        short_answers = [_tokens(r) for r in later]
        assert decoder.compiled is not None, "a capture while serving needed a compile"
        assert decoder.compiled.compiles == at_load and decoder.capture_failures == 0
    finally:
        scheduler.stop()
    assert answers == [_greedy_without_cache(model, p, 24) for p in prompts]
    assert short_answers == [_greedy_without_cache(model, p, 6) for p in shorts]


def test_a_compiled_step_that_fails_gives_way_to_the_uncompiled_one(monkeypatch):
    from workers.engines.step_setup import CompiledStep

    def failing(self, **inputs):
        raise RuntimeError("inductor: a lowering failed")

    monkeypatch.setenv("LLMSITE_COMPILE", "1")
    monkeypatch.setattr(CompiledStep, "__call__", failing)
    scheduler = _static(monkeypatch, ahead=True)
    try:
        decoder = scheduler.decoder
        assert scheduler.decode_mode == "slots, static buffers (CUDA graphs emulated), one step ahead"
        assert decoder.compiled is None and decoder.capture_failures == 0 and decoder.graphs == "emulate"
        prompts = [[3 + i] * 5 for i in range(3)]
        requests = [BatchRequest(id=str(i), prompt_ids=p, max_new_tokens=6, greedy=True) for i, p in enumerate(prompts)]
        for request in requests:
            scheduler.submit(request)
        assert [_tokens(r) for r in requests] == [_greedy_without_cache(_tiny("llama"), p, 6) for p in prompts]
    finally:
        scheduler.stop()


def test_a_compiled_step_that_fails_only_over_wider_buffers_keeps_its_graphs_and_says_so(monkeypatch):
    # The graphs captured at load replay the compiled step; the wider compile fails, so graphs
    # captured later (after a long request widens the buffers) replay the plain one.
    from workers.engines.slots import MIN_WIDTH
    from workers.engines.step_setup import CompiledStep

    compiled_call = CompiledStep.__call__

    def narrow_only(self, **inputs):
        if inputs[self.cache_arg].columns > MIN_WIDTH:
            raise RuntimeError("inductor: a lowering failed")
        return compiled_call(self, **inputs)

    monkeypatch.setenv("LLMSITE_COMPILE", "1")
    monkeypatch.setattr(CompiledStep, "__call__", narrow_only)
    scheduler = _static(monkeypatch, ahead=True)
    try:
        decoder = scheduler.decoder
        assert decoder.compiled is None and decoder.compiled_graphs() == (3, 3)
        assert scheduler.decode_mode == "slots, static buffers (CUDA graphs emulated), compiled in 3 of 3 graphs, one step ahead"
        model, prompt = _tiny("llama"), [(7 * i + 1) % 300 for i in range(300)]
        assert _ask_one(scheduler, prompt, 6) == _greedy_without_cache(model, prompt, 6)
        assert decoder.cache.columns == 2 * MIN_WIDTH and decoder.compiled_graphs()[0] == 0, "captured again, uncompiled"
        assert _ask_one(scheduler, [4, 5, 6], 6) == _greedy_without_cache(model, [4, 5, 6], 6)
        assert decoder.capture_failures == 0 and decoder.graphs == "emulate"
    finally:
        scheduler.stop()


def test_a_compiled_step_whose_logits_differ_is_checked_again_uncompiled(monkeypatch):
    from workers.engines.step_setup import CompiledStep

    def doubled(self, **inputs):
        output = self.model(**inputs)
        output.logits = output.logits * 2  # runs, and is wrong
        return output

    monkeypatch.setenv("LLMSITE_COMPILE", "1")
    monkeypatch.setattr(CompiledStep, "__call__", doubled)
    scheduler = _static(monkeypatch, ahead=True)
    try:
        assert scheduler.decode_mode == "slots, static buffers (CUDA graphs emulated), one step ahead"
        assert scheduler.decoder.compiled is None
        prompt = [4, 5, 6, 7]
        assert _ask_one(scheduler, prompt, 6) == _greedy_without_cache(_tiny("llama"), prompt, 6)
    finally:
        scheduler.stop()


def test_a_released_compiled_step_lets_go_of_its_model(monkeypatch):
    # A reload closes the old engine and releases its scheduler: torch.compile's caches (the
    # compiled graph, its guards, the code cache of the forward every model shares) must not keep
    # the old model's weights alive, nor may what the step captured.
    monkeypatch.setenv("LLMSITE_COMPILE", "1")
    scheduler = _static(monkeypatch, ahead=True)
    try:
        assert scheduler.decoder.compiled is not None
        assert len(_ask_one(scheduler, [5, 6, 7], 4)) == 4
        gone = weakref.ref(scheduler.model)
    finally:
        scheduler.stop()
    scheduler.release()
    gc.collect()
    assert gone() is None, [type(r).__name__ for r in gc.get_referrers(gone())]


def test_growing_columns_keeps_the_rows_asked_for_and_their_values():
    cache = SlotCache(_tiny("llama"), torch.device("cpu"), torch.float32)
    cache.ensure(8, 16)
    for layer in range(cache.layers):
        cache.store(1, layer, torch.full((cache.kv_heads, 3, cache.head_dim), 2.0), torch.full((cache.kv_heads, 3, cache.head_dim), 5.0))
    assert cache.ensure(2, 40)
    assert (cache.rows, cache.columns) == (2, 64)
    assert all(float(layer[1, :, :3].min()) == 2.0 and float(layer[1, :, :3].max()) == 2.0 for layer in cache.keys)
    assert all(float(layer[1, :, 3:].abs().sum()) == 0 and float(layer[0].abs().sum()) == 0 for layer in cache.values)
    assert cache.ensure(3, 64) and (cache.rows, cache.columns) == (4, 64)
    assert all(float(layer[1, :, :3].min()) == 5.0 for layer in cache.values)
    assert cache.ensure(2, 128) and (cache.rows, cache.columns) == (2, 128)
    assert all(float(layer[1, :, :3].min()) == 5.0 for layer in cache.values)
    assert cache.ensure(1, 256) and (cache.rows, cache.columns) == (1, 256)
    assert cache.ensure(3, 256) and (cache.rows, cache.columns) == (4, 256)
    for layer in range(cache.layers):
        cache.store(1, layer, torch.full((cache.kv_heads, 3, cache.head_dim), 2.0), torch.full((cache.kv_heads, 3, cache.head_dim), 5.0))
    assert cache.ensure(1, 512) and (cache.rows, cache.columns) == (2, 512), "the rows that fit in the bytes it had"
    assert all(float(layer[1].abs().sum()) == 0 for layer in cache.values), "row 1 held nobody's keys: not copied"
    assert not cache.ensure(2, 300), "a row joining after the widening finds room"
    assert cache.ensure(1, 2048) and (cache.rows, cache.columns) == (1, 2048), "never fewer than asked for"


def _answers(scheduler: BatchingScheduler, plan: list[dict]) -> list[list[int]]:
    """Each planned request's tokens; the second half joins once the first half is running."""
    from llmsite.contract import SamplingParams
    from workers.engines.sampling import TokenPolicy

    requests = []
    for i, item in enumerate(plan):
        request = BatchRequest(
            id=str(i), prompt_ids=item["prompt"], max_new_tokens=item["new"], greedy=True, stop_ids=frozenset(item.get("stop", ())),
        )
        if item.get("penalty"):
            params = SamplingParams(
                max_new_tokens=item["new"], temperature=0, top_k=0, top_p=1.0, do_sample=False, repetition_penalty=item["penalty"]
            )
            request.policy = TokenPolicy(params, item["prompt"], 300, {})
        requests.append(request)
    half = len(requests) // 2
    for request in requests[:half]:
        scheduler.submit(request)
    first = requests[0].out.get(timeout=60)
    for request in requests[half:]:
        scheduler.submit(request)
    answers = [_tokens(r) for r in requests]
    answers[0].insert(0, first[1])
    return answers


def test_one_step_ahead_gives_the_same_tokens_and_stops_where_the_host_would(monkeypatch):
    model = _tiny("llama")  # the same random weights as _static's (seeded)
    prompts = [[5, 6, 7], [9, 8, 7, 6, 5, 4, 3], [11] * 12, [40, 41], [7] * 5, [100, 3, 9, 27]]
    reference = [_greedy_without_cache(model, prompt, 12) for prompt in prompts]
    plan = [{"prompt": p, "new": 12 - (i % 3) * 4} for i, p in enumerate(prompts)]
    plan[1]["stop"] = [reference[1][3]]  # ends at its 4th token's first appearance, which is not sent
    plan[4]["stop"] = [reference[4][0]]  # ends at once
    expected = [ref[: item["new"]] for ref, item in zip(reference, plan)]
    for i in (1, 4):
        expected[i] = reference[i][: reference[i].index(plan[i]["stop"][0])]
    got = {}
    for ahead in (True, False):
        scheduler = _static(monkeypatch, ahead, max_batch_size=4)
        try:
            got[ahead] = _answers(scheduler, plan)
            assert scheduler.running == 0 and scheduler._batch.requests == []
        finally:
            scheduler.stop()
    assert got[True] == expected
    assert got[False] == expected


def test_a_row_whose_tokens_the_host_chooses_makes_the_steps_wait_and_ahead_resumes_after_it(monkeypatch):
    # A repetition penalty (a TokenPolicy) needs each token on the host before the next step.
    prompts = [[5, 6, 7], [9, 8, 7, 6, 5, 4, 3], [11] * 12, [40, 41]]
    plan = [{"prompt": p, "new": 10} for p in prompts]
    plan[2]["new"], plan[3]["penalty"] = 16, 1.5  # the penalised row leaves before the longest one
    got = {}
    for ahead in (True, False):
        scheduler = _static(monkeypatch, ahead, max_batch_size=4)
        try:
            got[ahead] = _answers(scheduler, plan)
        finally:
            scheduler.stop()
    assert got[True] == got[False]
    model = _tiny("llama")
    assert got[True][:3] == [_greedy_without_cache(model, p["prompt"], p["new"]) for p in plan[:3]]
    assert got[True][3] != _greedy_without_cache(model, prompts[3], 10), "the penalty changed nothing: a test that cannot fail"


# --- buckets ---------------------------------------------------------------------------------


def test_batch_buckets_hold_the_rows_and_stop_at_the_engine_size():
    assert [batch_bucket(n, 64) for n in (1, 2, 3, 5, 9, 17, 25, 33, 49, 64)] == [1, 2, 4, 8, 16, 24, 32, 48, 64, 64]
    assert batch_bucket(20, 20) == 20 and batch_bucket(300, 300) == 300
    assert all(batch_bucket(n, 256) >= n for n in range(1, 257))
    assert len({batch_bucket(n, 256) for n in range(1, 257)}) == len(BATCH_BUCKETS)


def test_width_buckets_are_powers_of_two_from_256():
    assert [width_bucket(w) for w in (1, 256, 257, 600, 1025)] == [256, 256, 512, 1024, 2048]


# --- the batched sampler -------------------------------------------------------------------------


def _row(greedy=False, **settings) -> BatchRequest:
    request = BatchRequest(id="r", prompt_ids=[1], max_new_tokens=1, greedy=greedy, **settings)
    start_sampling(request, "cpu")
    return request


def _generator(seed=0):
    generator = torch.Generator()
    generator.manual_seed(seed)
    return generator


LOGITS = torch.log(torch.tensor([0.1, 0.4, 0.3, 0.2]))  # best: 1, then 2, 3, 0


def test_greedy_top_k_1_and_tiny_top_p_rows_take_the_argmax_in_one_batch():
    rows = [_row(greedy=True), _row(top_k=1), _row(top_p=1e-6), None]
    assert sample_rows(rows, LOGITS.repeat(4, 1), _generator()) == [1, 1, 1, 1]


def test_sampled_rows_follow_their_distributions():
    generator = _generator()
    draws = {"plain": Counter(), "top_k2": Counter(), "top_p": Counter()}
    rows = [_row(), _row(top_k=2), _row(top_p=0.5)]
    for _ in range(4000):
        plain, top_k2, top_p = sample_rows(rows, LOGITS.repeat(3, 1), generator)
        draws["plain"][plain] += 1
        draws["top_k2"][top_k2] += 1
        draws["top_p"][top_p] += 1
    share = {kind: {t: n / 4000 for t, n in counter.items()} for kind, counter in draws.items()}
    for token, p in enumerate([0.1, 0.4, 0.3, 0.2]):
        assert abs(share["plain"].get(token, 0) - p) < 0.03, share["plain"]
    assert set(share["top_k2"]) == {1, 2} and abs(share["top_k2"][1] - 4 / 7) < 0.03
    # top_p 0.5 keeps the fewest best tokens reaching 0.5: 0.4 + 0.3
    assert set(share["top_p"]) == {1, 2} and abs(share["top_p"][1] - 4 / 7) < 0.03


def test_temperature_flattens_a_row():
    generator = _generator()
    cold, hot = _row(temperature=0.2), _row(temperature=5.0)
    counts = Counter()
    for _ in range(2000):
        a, b = sample_rows([cold, hot], LOGITS.repeat(2, 1), generator)
        counts["cold_best"] += a == 1
        counts["hot_best"] += b == 1
    expected = {t: torch.softmax(LOGITS / t, -1)[1].item() for t in (0.2, 5.0)}  # 0.787 and 0.283
    assert abs(counts["cold_best"] / 2000 - expected[0.2]) < 0.04
    assert abs(counts["hot_best"] / 2000 - expected[5.0]) < 0.04


def test_a_seeded_row_draws_the_same_whatever_its_neighbours():
    def run(neighbours: int, seed_of_others: int) -> list[int]:
        mine = _row(seed=5, top_k=3)
        rows = [mine] + [_row(seed=seed_of_others) for _ in range(neighbours)]
        generator = _generator(seed_of_others)
        return [sample_rows(rows, LOGITS.repeat(len(rows), 1), generator)[0] for _ in range(40)]

    alone = run(0, 1)
    assert run(3, 2) == alone and run(5, 3) == alone
    assert len(set(alone)) > 1

    def wide(neighbours: list[BatchRequest]) -> list[int]:  # 1000 tokens: the candidates, and a whole row sorted beside it
        mine = _row(seed=9, top_p=0.8)
        rows = [mine] + neighbours
        logits = torch.stack([_peaked()] + [torch.arange(1000, dtype=torch.float32) * -0.002] * len(neighbours))
        return [sample_rows(rows, logits, _generator(len(neighbours)))[0] for _ in range(40)]

    assert wide([]) == wide([_row(top_p=0.9), _row(), _row(seed=4, top_k=600)]) == wide([_row(seed=1)])


def test_kept_row_settings_draw_as_fresh_ones_and_are_made_again_when_the_rows_change():
    from workers.engines.batch_sampling import RowSettings, choose_rows

    def rows():
        return [_row(seed=1, top_k=2), _row(greedy=True), _row(seed=2, temperature=0.5), None, _row(top_p=0.6)]

    kept, with_kept, fresh = RowSettings(), rows(), rows()
    logits = LOGITS.repeat(5, 1)
    kept_draws = [choose_rows(with_kept, logits, _generator(7), kept).tolist() for _ in range(30)]
    assert kept_draws == [choose_rows(fresh, logits, _generator(7)).tolist() for _ in range(30)]
    assert len({tuple(d) for d in kept_draws}) > 1, "the seeded rows drew different tokens over the steps"

    a, c = with_kept[0], with_kept[2]
    first = kept.of([0, 2], [a, c], logits)
    assert kept.of([0, 2], [a, c], logits) is first, "the same requests in the same rows: nothing copied again"
    moved = kept.of([0, 1], [a, c], logits)  # c moved down a row (a row before it finished)
    assert moved is not first and moved.index.tolist() == [0, 1]
    assert moved.plain.tolist() == [1] and moved.filtered.tolist() == [0] and moved.top_k.tolist() == [[2]]
    twin = _row(seed=2, temperature=0.5)  # another request with the same settings
    assert kept.of([0, 1], [a, twin], logits) is not moved
    unfiltered = kept.of([0], [c], logits)
    assert unfiltered.top_k is None and unfiltered.filtered is None and unfiltered.plain == slice(None), "no top-k/top-p row: no sort"
    assert unfiltered.temperature.tolist() == [[0.5]]


def test_the_pick_never_lands_on_a_token_of_probability_zero():
    # A number at the very sum (rounding can put it there) would pass every column: the last
    # column here has probability 0 (cut by top-k or top-p), so the likeliest token is taken.
    from workers.engines.batch_sampling import _pick

    probs = torch.tensor([[0.25, 0.75, 0.0], [0.5, 0.0, 0.5]])
    assert _pick(probs, torch.tensor([[1.0], [0.5]], dtype=torch.float64)).tolist() == [1, 2]
    assert _pick(probs, torch.tensor([[0.0], [0.0]], dtype=torch.float64)).tolist() == [0, 0]


def _peaked(vocab=1000):
    """Tokens 0-3 with 0.4, 0.3, 0.2 and 0.05; the other 996 share the last 0.05."""
    probs = torch.full((vocab,), 0.05 / (vocab - 4))
    probs[:4] = torch.tensor([0.4, 0.3, 0.2, 0.05])
    return probs.log()


def test_on_cpu_a_filtered_row_is_drawn_among_its_best_candidates_with_the_same_odds():
    # 1000 tokens: the top-k and top-p rows' kept tokens lie among the best CANDIDATES (256),
    # which are all that is sorted; the plain row draws from all 1000.
    from workers.engines.batch_sampling import CANDIDATES

    assert CANDIDATES < 1000
    generator = _generator()
    rows = [_row(top_p=0.8), _row(top_k=2), _row()]
    counts = [Counter() for _ in rows]
    for _ in range(3000):
        for counter, token in zip(counts, sample_rows(rows, _peaked().repeat(3, 1), generator)):
            counter[token] += 1
    top_p, top_k, plain = ({t: n / 3000 for t, n in c.items()} for c in counts)
    assert set(top_p) == {0, 1, 2}, "0.4 + 0.3 + 0.2 reaches 0.8: token 3 is cut"
    for token, p in enumerate([4 / 9, 3 / 9, 2 / 9]):
        assert abs(top_p[token] - p) < 0.03, top_p
    assert set(top_k) == {0, 1} and abs(top_k[0] - 4 / 7) < 0.03
    assert abs(plain.get(0, 0) - 0.4) < 0.03 and abs(sum(n for t, n in plain.items() if t >= 4) - 0.05) < 0.02


def test_on_cpu_a_top_p_mass_past_the_candidates_sorts_that_row_whole_and_no_other():
    # Near-flat odds over 1000 tokens: top_p 0.9 keeps several hundred, past the best 256, so
    # that row is drawn again from its whole sorted row; a peaked row beside it stays as it was.
    from workers.engines.batch_sampling import CANDIDATES

    flat = torch.arange(1000, dtype=torch.float32) * -0.002  # token 0 the likeliest, then 1, 2, ...
    probs = flat.softmax(-1)
    nucleus = int(((probs.cumsum(-1) - probs) < 0.9).sum())  # the fewest best tokens reaching 0.9
    assert nucleus > 2 * CANDIDATES
    generator = _generator()
    wide, narrow = Counter(), Counter()
    for _ in range(2000):
        a, b = sample_rows([_row(top_p=0.9), _row(top_p=0.8)], torch.stack([flat, _peaked()]), generator)
        wide[a] += 1
        narrow[b] += 1
    assert max(wide) < nucleus and max(wide) >= CANDIDATES and len(wide) > CANDIDATES, (max(wide), len(wide))
    assert set(narrow) == {0, 1, 2}
    below = sum(n for t, n in wide.items() if t < CANDIDATES) / 2000
    expected = float(probs[:CANDIDATES].sum() / probs[:nucleus].sum())
    assert abs(below - expected) < 0.04, (below, expected)


def test_on_cpu_a_top_k_past_the_candidates_draws_among_its_best_top_k_without_a_whole_sort():
    # Near-flat odds over 1000 tokens: top_k 300 keeps tokens 0-299, past the best 256 but under a
    # third of the row, so that row is drawn again from a partial sort of its best 300 (topk).
    from torch.profiler import profile

    flat = torch.arange(1000, dtype=torch.float32) * -0.002  # token 0 the likeliest, then 1, 2, ...
    probs = flat[:300].softmax(-1)
    generator = _generator()
    with profile() as prof:
        sample_rows([_row(top_k=300)], flat.unsqueeze(0), generator)
    operators = {event.name for event in prof.events()}
    assert "aten::topk" in operators and "aten::sort" not in operators
    counts = Counter(sample_rows([_row(top_k=300)], flat.unsqueeze(0), generator)[0] for _ in range(2000))
    assert max(counts) < 300 and max(counts) >= 256, max(counts)
    past = sum(n for t, n in counts.items() if t >= 256) / 2000
    assert abs(past - float(probs[256:].sum())) < 0.03, past


def test_a_reused_slot_holds_zeros_past_its_request_not_the_last_ones_values():
    # Masked columns still enter the attention's sum as 0 x value: an inf left there would be NaN.
    cache = SlotCache(_tiny("llama"), torch.device("cpu"), torch.float32)
    cache.ensure(2, 16)
    for layer in range(cache.layers):
        with torch.inference_mode():  # the buffers are inference tensors, as in the engine's thread
            cache.keys[layer].fill_(float("inf"))
            cache.values[layer].fill_(float("inf"))
        cache.store(0, layer, torch.ones(cache.kv_heads, 3, cache.head_dim), torch.ones(cache.kv_heads, 3, cache.head_dim))
    cache.move(0, 1, 3)
    for buffers in (cache.keys, cache.values):
        assert all(bool(torch.isfinite(layer[:2]).all()) and float(layer[:2, :, 3:].abs().sum()) == 0 for layer in buffers)
