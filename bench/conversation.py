"""Time to first token along one chat conversation, with and without the llama.cpp engine's saved
prompts (`make bench-conversation`).

One conversation of TURNS turns (a system prompt, then a question a turn, each answer fed back as
the chat page does), asked of two engines of the default deployment in this process: one as
configured, one with LLAMACPP_PROMPT_CACHE_MIB=0 (its kept prefix still on). The two take each turn
in turn, so the machine's drift falls on both alike, and both must give the same answers. Prints one
table (TTFT per turn and the ratio) and writes bench/results/conversation.json.
"""

import json
import os
import sys
import time
from pathlib import Path

BASE_DIR = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(BASE_DIR))
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "llmsite.settings")

import django  # noqa: E402

django.setup()

from django.core.management import call_command  # noqa: E402

from llmsite.contract import SamplingParams  # noqa: E402
from chat.models import Deployment  # noqa: E402
from chat.prompting import render_prompt  # noqa: E402

NEW_TOKENS = int(os.environ.get("BENCH_NEW_TOKENS", "96"))
QUESTIONS = [
    "I am planning a week in Italy. Which cities should I visit?",
    "Tell me more about the first one.",
    "What food should I try there?",
    "How do I get from there to the second city?",
    "What is the weather like in spring?",
    "Which museums are worth the time?",
    "Give me a day-by-day plan for the week.",
    "What should I pack?",
]
SYSTEM = "You are a friendly travel guide. Answer in a few sentences."


def engine_with(deployment, **overrides):
    from django.test import override_settings

    from workers.engines.llamacpp.engine import LlamaCppEngine

    with override_settings(**overrides):  # LLAMACPP_* settings (llmsite/settings.py), while it loads
        return LlamaCppEngine(deployment)


def ask(engine, messages) -> tuple[str, float]:
    from workers.engines.base import GenerationResult

    prompt = render_prompt(engine.tokenizer, messages)
    params = SamplingParams(max_new_tokens=NEW_TOKENS, temperature=0, top_k=0, top_p=1.0, do_sample=False)
    sent, first, pieces = time.perf_counter(), None, []
    for piece in engine.stream(prompt, params, GenerationResult(), lambda: False):
        first = first or time.perf_counter()
        pieces.append(piece)
    return "".join(pieces), first - sent


def main():
    call_command("migrate", interactive=False, verbosity=0)
    call_command("setup_site", "--no-admin", verbosity=0)
    deployment = Deployment.objects.get(name="default")
    if deployment.engine != "llamacpp":
        sys.exit(f"the default deployment runs the {deployment.engine} engine; this bench measures the llamacpp engine's saved prompts")
    deployment.max_batch_size = 2  # one conversation: a small KV cache
    engines = {"saved": engine_with(deployment), "not saved": engine_with(deployment, LLAMACPP_PROMPT_CACHE_MIB=0)}
    for engine in engines.values():
        ask(engine, [{"role": "user", "content": "Hello"}])  # warm-up
    history = [{"role": "system", "content": SYSTEM}]
    rows = []
    for turn, question in enumerate(QUESTIONS, 1):
        history.append({"role": "user", "content": question})
        tokens = engines["saved"].count_tokens(render_prompt(engines["saved"].tokenizer, history))
        answers, ttft = {}, {}
        for name, engine in engines.items():
            answers[name], ttft[name] = ask(engine, history)
        same = answers["saved"] == answers["not saved"]
        rows.append({"turn": turn, "prompt_tokens": tokens, "ttft_ms_saved": round(ttft["saved"] * 1000, 1),
                     "ttft_ms_not_saved": round(ttft["not saved"] * 1000, 1), "same_answer": same})
        history.append({"role": "assistant", "content": answers["saved"]})
        print(f"turn {turn}: {tokens} prompt tokens, TTFT {ttft['not saved'] * 1000:.0f} -> {ttft['saved'] * 1000:.0f} ms", flush=True)
    for engine in engines.values():
        engine.scheduler.stop()

    last = rows[-1]
    print()
    print("| turn | prompt tokens | TTFT not saved (ms) | TTFT saved (ms) | ratio | same answer |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        ratio = r["ttft_ms_not_saved"] / r["ttft_ms_saved"]
        print(f"| {r['turn']} | {r['prompt_tokens']} | {r['ttft_ms_not_saved']} | {r['ttft_ms_saved']} | {ratio:.1f}x | {'yes' if r['same_answer'] else 'no'} |")
    result = {
        "new_tokens": NEW_TOKENS,
        "turns": rows,
        "last_turn_ttft_ratio": round(last["ttft_ms_not_saved"] / last["ttft_ms_saved"], 2),
    }
    out = BASE_DIR / "bench" / "results" / "conversation.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nlast turn: {result['last_turn_ttft_ratio']}x faster to the first token; written to {out.relative_to(BASE_DIR)}")


if __name__ == "__main__":
    main()
