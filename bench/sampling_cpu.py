"""The transformers engine's sampled rows on CPU (workers/engines/batch_sampling.py) against what
they replaced, in one run: now one uniform number per row, a top-k/top-p row drawn among its
best CANDIDATES tokens (its whole row sorted only where its kept tokens reach past them); before,
an exponential race over every token (one random number per token), every top-k/top-p row
sorted whole (`race_draw` below, the earlier code, as the baseline).

    .venv/bin/python bench/sampling_cpu.py [RESULT_JSON]

Two tables. The draw alone: ms per step for 64 sampled rows, with temperature only, the
deployment's defaults (temperature 0.95, top_p 0.8) and top_k 50, over the default model's own
logits (49,152 tokens, 64 positions of its answers to the chat prompts), over them as wide as
Qwen2.5's vocabulary (151,936: each token's logit three times and more), and over random logits
as wide (flat: every top-p row is sorted whole, the worst case); and how many rows at the
defaults were sorted whole. The engine:
output tokens/s of the default model (fp32) at 1, 8 and 32 streams sampled with the deployment's
defaults, 32 new tokens each, each way twice interleaved, the better rate.
"""

import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

from bench.gpu_check import prompts  # noqa: E402
from bench.slots_cpu import DEFAULT  # noqa: E402
from workers.engines import batch_sampling  # noqa: E402
from workers.engines.batching import BatchingScheduler  # noqa: E402
from workers.engines.scheduling import BatchRequest  # noqa: E402
from workers.engines.transformers_engine import TransformersEngine, resolve_source  # noqa: E402

NOW = batch_sampling._draw
SETTINGS = {"temperature 0.95": {"temperature": 0.95}, "defaults (0.95, top_p 0.8)": {"temperature": 0.95, "top_p": 0.8}, "top_k 50": {"top_k": 50}}
STREAMS = (1, 8, 32)
NEW_TOKENS = 32


def race_draw(requests, logits, generator, kept):
    """The baseline: the exponential race argmax(p / E), E ~ Exp(1) for every token, over each
    filtering row's whole sorted row."""
    scores = logits.float() / kept.temperature
    order = None
    if kept.top_k is not None:
        scores, order = scores.sort(dim=-1, descending=True)
        scores = scores.masked_fill(kept.columns >= kept.top_k, float("-inf"))
        probs = scores.softmax(-1)
        scores = scores.masked_fill(probs.cumsum(-1) - probs >= kept.top_p, float("-inf"))
    probs = scores.softmax(-1)
    race = torch.empty_like(probs).exponential_(generator=generator)
    for row, request in enumerate(requests):
        if request.seed is not None:
            race[row].exponential_(generator=request.generator)
    choice = (probs / race.clamp_(min=1e-20)).argmax(-1)
    return choice if order is None else order.gather(1, choice.unsqueeze(1)).squeeze(1)


def sampled(i: int, prompt_ids: list[int], new_tokens: int, **settings) -> BatchRequest:
    request = BatchRequest(id=f"s{i}-{time.monotonic_ns()}", prompt_ids=prompt_ids, max_new_tokens=new_tokens, greedy=False, **settings)
    batch_sampling.start_sampling(request, "cpu")
    return request


def draw_ms(logits: torch.Tensor, settings: dict, draw, repeats: int = 5) -> float:
    batch_sampling._draw = draw
    try:
        requests = [sampled(i, [1], 1, **settings) for i in range(logits.shape[0])]
        generator, kept = torch.Generator(), batch_sampling.RowSettings()
        batch_sampling.choose_rows(requests, logits, generator, kept)
        started = time.perf_counter()
        for _ in range(repeats):
            batch_sampling.choose_rows(requests, logits, generator, kept)
        return (time.perf_counter() - started) / repeats * 1000
    finally:
        batch_sampling._draw = NOW


def model_logits(model, batch) -> torch.Tensor:
    """64 rows of the model's next-token logits: 16 prompts at 4 positions of their answers."""
    rows = []
    with torch.inference_mode():
        for ids in batch[:16]:
            out = model.generate(torch.tensor([ids]), max_new_tokens=4, do_sample=False, output_logits=True, return_dict_in_generate=True)
            rows += [step[0] for step in out.logits]
    return torch.stack(rows).float()


def sorted_whole(logits: torch.Tensor, top_p: float, temperature: float) -> int:
    """Rows whose fewest best tokens reaching top_p lie past the best CANDIDATES."""
    probs = (logits / temperature).softmax(-1).sort(dim=-1, descending=True).values
    return int((((probs.cumsum(-1) - probs) < top_p).sum(-1) > batch_sampling.CANDIDATES).sum())


def engine_rate(engine, batch, settings) -> float:
    requests = [sampled(i, ids, NEW_TOKENS, **settings) for i, ids in enumerate(batch)]
    started = time.perf_counter()
    for request in requests:
        engine.submit(request)
    count = 0
    for request in requests:
        while request.out.get(timeout=600)[0] == "token":
            count += 1
    return count / (time.perf_counter() - started)


def main(out: str) -> None:
    folder, _ = TransformersEngine._dequantized(*resolve_source(DEFAULT))
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    batch = prompts(tokenizer)
    own = model_logits(model, batch)
    torch.manual_seed(0)
    tiled = own.repeat(1, 4)[:, :151936]
    flat = torch.randn(64, 151936) * own.std(-1).mean() + own.mean()
    report = {"torch": torch.__version__, "threads": torch.get_num_threads(), "candidates": batch_sampling.CANDIDATES, "draw_ms": {}, "tok_s": {}}
    print("| logits (64 rows) | settings | before ms | now ms | before / now |")
    print("|---|---|---|---|---|")
    logit_sets = {
        "SmolLM2-135M's own, 49,152 tokens": own, "the model's, tiled to 151,936 tokens": tiled, "random (flat), 151,936 tokens": flat,
    }
    for name, logits in logit_sets.items():
        for label, settings in SETTINGS.items():
            before, now = draw_ms(logits, settings, race_draw), draw_ms(logits, settings, NOW)
            report["draw_ms"][f"{name} | {label}"] = {"before": round(before, 2), "now": round(now, 2)}
            print(f"| {name} | {label} | {before:.1f} | {now:.1f} | {before / now:.1f} |")
    report["rows_sorted_whole_at_defaults"] = {name: f"{sorted_whole(logits, 0.8, 0.95)}/64" for name, logits in logit_sets.items()}
    print("\nrows sorted whole at the defaults:", report["rows_sorted_whole_at_defaults"], "\n")
    engine = BatchingScheduler(model, max_batch_size=32, name="sampling")
    settings = SETTINGS["defaults (0.95, top_p 0.8)"]
    best = {(way, n): 0.0 for way in ("before", "now") for n in STREAMS}
    for n in STREAMS:
        engine_rate(engine, batch[:n], settings)  # warm
        for _ in range(2):
            for way, draw in (("before", race_draw), ("now", NOW)):
                batch_sampling._draw = draw
                try:
                    best[way, n] = max(best[way, n], engine_rate(engine, batch[:n], settings))
                finally:
                    batch_sampling._draw = NOW
    engine.stop()
    print("| streams (defaults: temperature 0.95, top_p 0.8) | before tok/s | now tok/s | now / before |")
    print("|---|---|---|---|")
    for n in STREAMS:
        report["tok_s"][n] = {"before": round(best["before", n], 1), "now": round(best["now", n], 1)}
        print(f"| {n} | {best['before', n]:.1f} | {best['now', n]:.1f} | {best['now', n] / best['before', n]:.2f} |")
    Path(out).write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else str(ROOT / "bench" / "results" / "sampling_cpu.json"))
