"""Checks the transformers engine (continuous batching) on a CUDA GPU, without the rest of the stack.

The lent GPU machine has torch and transformers but none of the site's other packages and no
model hub, so this builds the default model's architecture (config.json beside its tokenizer in
MODEL_FOLDER) with random weights and runs the engine in-process:

    python bench/gpu_check.py MODEL_FOLDER RESULT_JSON [--quick]

It prints and writes: the device, batched-vs-single greedy agreement (fp32), abort isolation,
output tokens/s at 1/8/32/64 concurrent streams for fp32 and bf16, and bf16's rate over fp32's.
"""

import importlib.util
import json
import sys
import tempfile
import threading
import time
import types
from pathlib import Path
from types import SimpleNamespace

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
if importlib.util.find_spec("celery") is None:
    # The GPU machine has no Celery: load the engines without the package's Celery app.
    workers = types.ModuleType("workers")
    workers.__path__ = [str(ROOT / "workers")]
    sys.modules["workers"] = workers

import torch  # noqa: E402
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer  # noqa: E402

from llmsite.contract import SamplingParams  # noqa: E402
from workers.engines.base import GenerationResult  # noqa: E402
from workers.engines.transformers_engine import TransformersEngine  # noqa: E402

QUESTIONS = [f"What is the capital of country number {i}?" for i in range(64)]


def build_model(source: str, folder: str) -> None:
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(source))
    model.save_pretrained(folder)
    AutoTokenizer.from_pretrained(source).save_pretrained(folder)


def greedy(n: int) -> SamplingParams:
    return SamplingParams(max_new_tokens=n, temperature=0, top_k=0, top_p=1.0, do_sample=False)


def ask(engine, question, params, cancelled=lambda: False, tokens=None):
    prompt = engine.tokenizer.apply_chat_template(
        [{"role": "user", "content": question}], tokenize=False, add_generation_prompt=True
    )
    result = GenerationResult()
    pieces = []
    for piece in engine.stream(prompt, params, result, cancelled):
        pieces.append(piece)
        if tokens is not None:
            tokens.append(time.perf_counter())
    return "".join(pieces), result


def ask_all(engine, questions, params):
    answers = [None] * len(questions)

    def run(i):
        answers[i] = ask(engine, questions[i], params)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(questions))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    return answers


def throughput(engine, n: int, new_tokens: int) -> float:
    started = time.perf_counter()
    answers = ask_all(engine, QUESTIONS[:n], greedy(new_tokens))
    wall = time.perf_counter() - started
    return sum(result.completion_tokens for _, result in answers) / wall


def engine_for(folder: str, precision: str) -> TransformersEngine:
    deployment = SimpleNamespace(
        name=f"gpu-{precision}", model_source=folder, model_type="auto", precision=precision, max_batch_size=64
    )
    return TransformersEngine(deployment)


def main(source: str, out: str, quick: bool = False) -> None:
    sizes, new_tokens = ((1, 4), 8) if quick else ((1, 8, 32, 64), 128)
    report = {
        "torch": torch.__version__,
        "cuda_available": torch.cuda.is_available(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }
    import transformers

    report["transformers"] = transformers.__version__
    with tempfile.TemporaryDirectory() as folder:
        build_model(source, folder)
        engine = engine_for(folder, "fp32")
        report["engine_device"] = str(engine.scheduler.device)
        if torch.cuda.is_available():  # the engine turns cuDNN's attention off (see batching.py)
            report["cudnn_sdp_enabled"] = torch.backends.cuda.cudnn_sdp_enabled()

        ask(engine, "warm up", greedy(4))
        single = [ask(engine, q, greedy(16))[0] for q in QUESTIONS[:16]]
        batched = [text for text, _ in ask_all(engine, QUESTIONS[:16], greedy(16))]
        report["fp32_batched_equals_single"] = sum(a == b for a, b in zip(single, batched))
        report["fp32_batched_compared"] = 16

        flag = threading.Event()
        seen = []
        victim = {}

        def aborted():
            victim["answer"] = ask(engine, QUESTIONS[40], greedy(200), cancelled=flag.is_set, tokens=seen)

        thread = threading.Thread(target=aborted)
        thread.start()
        while len(seen) < 3 and thread.is_alive():
            time.sleep(0.005)
        others = ask_all(engine, QUESTIONS[:7], greedy(32))
        flag.set()
        thread.join(60)
        report["abort_finish_reason"] = victim["answer"][1].finish_reason
        report["abort_others_full"] = sum(r.completion_tokens == 32 or r.finish_reason == "stop" for _, r in others)
        time.sleep(0.5)
        report["abort_running_after"] = engine.scheduler.running
        print({k: v for k, v in report.items()}, flush=True)

        for precision in ("fp32", "bf16"):
            if precision != "fp32":
                engine.scheduler.stop()
                engine = engine_for(folder, precision)
                ask(engine, "warm up", greedy(4))
            rates = {n: round(throughput(engine, n, new_tokens), 1) for n in sizes}
            report[f"{precision}_tok_s"] = rates
            report[f"{precision}_{sizes[-1]}_vs_1"] = round(rates[sizes[-1]] / rates[1], 2)
            print(precision, rates, flush=True)
        report["bf16_vs_fp32"] = {n: round(report["bf16_tok_s"][n] / report["fp32_tok_s"][n], 2) for n in sizes}
        engine.scheduler.stop()
    text = json.dumps(report, indent=2)
    print(text)
    Path(out).write_text(text)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], quick="--quick" in sys.argv)
