"""The transformers engine's sampled rows on CPU (workers/engines/batch_sampling.py) against what
they replaced, in one run: now one uniform number per row, a top-k/top-p row drawn among its
best CANDIDATES tokens (its whole row sorted only where its kept tokens reach past them); before,
an exponential race over every token (one random number per token), every top-k/top-p row
sorted whole (`race_draw` below, the earlier code, as the baseline).

    .venv/bin/python bench/sampling_cpu.py [RESULT_JSON]

Two tables. The draw alone: ms per step for 64 sampled rows, with temperature only, the
deployment's defaults (temperature 0.95, top_p 0.8), top_k 50 and top_k 1000 (past the
candidates: drawn again from a partial sort of its best 1000), over the default model's own
logits (49,152 tokens, 64 positions of its answers to the chat prompts), over them as wide as
Qwen2.5's vocabulary (151,936: each token's logit three times and more), and over random logits
as wide (flat: every top-p row is sorted whole, the worst case); and how many rows at the
defaults were sorted whole. The engine:
output tokens/s of the default model (fp32) at 1, 8 and 32 streams sampled with the deployment's
defaults, 32 new tokens each, each way twice interleaved, the better rate; and the same for the
llama.cpp engine (the default deployment's, Q4_1), whose sampled rows before drew one at a time
through transformers' logits warpers and torch.multinomial (`warper_token`), now in one batch.
"""

import contextlib
import json
import os
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
SETTINGS = {
    "temperature 0.95": {"temperature": 0.95}, "defaults (0.95, top_p 0.8)": {"temperature": 0.95, "top_p": 0.8},
    "top_k 50": {"top_k": 50}, "top_k 1000": {"top_k": 1000},
}
STREAMS = (1, 8, 32)
NEW_TOKENS = 32


def race_draw(requests, logits, generator, kept):
    """The baseline: the exponential race argmax(p / E), E ~ Exp(1) for every token, over each
    filtering row's whole sorted row (the rows here all share their settings: all filter or none)."""
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


def warper_token(request, logits) -> int:
    """The llama.cpp engine's baseline: one row through transformers' warpers and torch.multinomial."""
    from transformers import LogitsProcessorList, TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

    processors = LogitsProcessorList()
    if request.temperature and request.temperature != 1.0:
        processors.append(TemperatureLogitsWarper(request.temperature))
    if request.top_k:
        processors.append(TopKLogitsWarper(request.top_k))
    if request.top_p < 1.0:
        processors.append(TopPLogitsWarper(request.top_p))
    scores = processors(None, logits.float().unsqueeze(0))
    return int(torch.multinomial(torch.softmax(scores, -1), 1, generator=request.generator))


def llamacpp_engine():
    """The default deployment's llama.cpp engine, from an unsaved Deployment (no database)."""
    import django

    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "llmsite.settings")
    django.setup()
    from chat.models import Deployment
    from workers.engines.llamacpp.engine import LlamaCppEngine

    return LlamaCppEngine(Deployment(name="bench-sampling", model_source=DEFAULT, engine="llamacpp", max_batch_size=32))


def compare(scheduler, batch, settings, ways: dict) -> dict:
    """Output tokens/s at each of STREAMS, each way (a function that sets it up) twice, interleaved, the better rate."""
    best = {(way, n): 0.0 for way in ways for n in STREAMS}
    for n in STREAMS:
        engine_rate(scheduler, batch[:n], settings)  # warm
        for _ in range(2):
            for way, use in ways.items():
                with use():
                    best[way, n] = max(best[way, n], engine_rate(scheduler, batch[:n], settings))
    return best


def sampled(i: int, prompt_ids: list[int], new_tokens: int, **settings) -> BatchRequest:
    request = BatchRequest(id=f"s{i}-{time.monotonic_ns()}", prompt_ids=prompt_ids, max_new_tokens=new_tokens, greedy=False, **settings)
    batch_sampling.start_sampling(request, "cpu")
    return request


def draw_ms(logits: torch.Tensor, settings: dict, draw, repeats: int = 5) -> float:
    with patched(batch_sampling, "_draw", draw):
        requests = [sampled(i, [1], 1, **settings) for i in range(logits.shape[0])]
        generator, kept = torch.Generator(), batch_sampling.RowSettings()
        batch_sampling.choose_rows(requests, logits, generator, kept)
        started = time.perf_counter()
        for _ in range(repeats):
            batch_sampling.choose_rows(requests, logits, generator, kept)
        return (time.perf_counter() - started) / repeats * 1000


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


@contextlib.contextmanager
def patched(owner, name: str, value):
    """`owner.name` is `value` inside the block (a baseline's piece), and what it was after."""
    kept = getattr(owner, name)
    setattr(owner, name, value)
    try:
        yield
    finally:
        setattr(owner, name, kept)


def draw_table(report: dict, own: torch.Tensor) -> None:
    torch.manual_seed(0)
    logit_sets = {
        "SmolLM2-135M's own, 49,152 tokens": own,
        "the model's, tiled to 151,936 tokens": own.repeat(1, 4)[:, :151936],
        "random (flat), 151,936 tokens": torch.randn(64, 151936) * own.std(-1).mean() + own.mean(),
    }
    print("| logits (64 rows) | settings | before ms | now ms | before / now |")
    print("|---|---|---|---|---|")
    for name, logits in logit_sets.items():
        for label, settings in SETTINGS.items():
            before, now = draw_ms(logits, settings, race_draw), draw_ms(logits, settings, NOW)
            report["draw_ms"][f"{name} | {label}"] = {"before": round(before, 2), "now": round(now, 2)}
            print(f"| {name} | {label} | {before:.1f} | {now:.1f} | {before / now:.1f} |")
    report["rows_sorted_whole_at_defaults"] = {name: f"{sorted_whole(logits, 0.8, 0.95)}/64" for name, logits in logit_sets.items()}
    print("\nrows sorted whole at the defaults:", report["rows_sorted_whole_at_defaults"], "\n")


def engine_tables(report: dict, model, batch) -> None:
    from workers.engines.llamacpp.scheduler import LlamaCppScheduler

    settings = SETTINGS["defaults (0.95, top_p 0.8)"]
    engine = BatchingScheduler(model, max_batch_size=32, name="sampling")
    race = {"before": lambda: patched(batch_sampling, "_draw", race_draw), "now": contextlib.nullcontext}
    rates = {"transformers": compare(engine, batch, settings, race)}
    engine.stop()

    def one_by_one():  # every sampled row through _sample_with_torch, which calls sample_token
        stack = contextlib.ExitStack()
        stack.enter_context(patched(LlamaCppScheduler, "_draw_sampled", lambda self, decoding, logits: {}))
        stack.enter_context(patched(batch_sampling, "sample_token", warper_token))
        return stack

    llamacpp = llamacpp_engine().scheduler
    rates["llamacpp"] = compare(llamacpp, batch, settings, {"before": one_by_one, "now": contextlib.nullcontext})
    llamacpp.stop()
    for name, best in rates.items():
        print(f"| {name} engine, streams (temperature 0.95, top_p 0.8) | before tok/s | now tok/s | now / before |")
        print("|---|---|---|---|")
        report["tok_s"][name] = {n: {"before": round(best["before", n], 1), "now": round(best["now", n], 1)} for n in STREAMS}
        for n in STREAMS:
            print(f"| {n} | {best['before', n]:.1f} | {best['now', n]:.1f} | {best['now', n] / best['before', n]:.2f} |")
        print()


def main(out: str) -> None:
    folder, _ = TransformersEngine._dequantized(*resolve_source(DEFAULT))
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    batch = prompts(tokenizer)
    report = {"torch": torch.__version__, "threads": torch.get_num_threads(), "candidates": batch_sampling.CANDIDATES, "draw_ms": {}, "tok_s": {}}
    draw_table(report, model_logits(model, batch))
    engine_tables(report, model, batch)
    Path(out).write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else str(ROOT / "bench" / "results" / "sampling_cpu.json"))
