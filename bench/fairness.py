"""Fair turns under load (`make bench`, after the pipeline): user B's time to the first token while
user A keeps the default deployment full (max_batch_size answers running) with 16 more of A's
requests waiting, against B's on the idle deployment; and how many of A's waiting requests started
before B's (the target is 0: B waits only for one of A's running answers to end, no preemption).
Prints one table and writes bench/results/fairness.json.
"""

import json
import sys
import threading
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from pipeline import BASE_DIR, Stack  # noqa: E402  (sets Django up)

import requests  # noqa: E402
from django.contrib.auth import get_user_model  # noqa: E402
from django.core.management import call_command  # noqa: E402

from chat.models import Deployment, RequestLog  # noqa: E402

WAITING = 16
A_BODY = {"prompt": "Count from 1 to 500, writing each number on its own line.", "temperature": 0, "max_new_tokens": 200, "use_stream_chat": True}
B_BODY = {"prompt": "Write a short paragraph about owls.", "temperature": 0, "max_new_tokens": 16, "use_stream_chat": True}


def ttft(url, token) -> float:
    sent = time.perf_counter()
    with requests.post(url, headers={"Authorization": token}, json=B_BODY, stream=True, timeout=600) as response:
        response.raise_for_status()
        for chunk in response.iter_lines(chunk_size=64, delimiter=b"\0"):
            if chunk:
                return time.perf_counter() - sent
    raise RuntimeError("no token came")


def fill(url, token, count) -> list:
    """`count` of A's long streams, sent at once (a waiting one's response begins with its first
    token: each is read on its own thread; the stack's end closes them)."""
    streams = [None] * count

    def send(i):
        try:
            streams[i] = requests.post(url, headers={"Authorization": token}, json=A_BODY, stream=True, timeout=600)
            for _ in streams[i].iter_content(chunk_size=None):
                pass
        except requests.RequestException:  # the stack stopped under it: the bench is over
            pass

    for i in range(count):
        threading.Thread(target=send, args=(i,), daemon=True).start()
    return streams


def wait_for(predicate, what: str) -> None:
    deadline = time.monotonic() + 600
    while not predicate():
        if time.monotonic() > deadline:
            raise SystemExit(f"timed out waiting for {what}")
        time.sleep(0.1)


def main():
    from chat.tokens import token_create

    call_command("migrate", interactive=False, verbosity=0)
    call_command("setup_site", "--no-admin", verbosity=0)
    deployment = Deployment.objects.get(name="default")
    a, b = (get_user_model().objects.create_user(f"bench-{who}-{uuid.uuid4().hex[:6]}") for who in "ab")
    a_token, b_token = token_create(user=a)[1], token_create(user=b)[1]
    slots = deployment.max_batch_size
    stack = Stack()
    try:
        ttft(stack.url, b_token)  # warm-up
        idle = ttft(stack.url, b_token)
        print(f"fairness: A fills the deployment ({slots} running) with {WAITING} more waiting, then B asks…", flush=True)
        fill(stack.url, a_token, slots + WAITING)
        mine = RequestLog.objects.filter(user=a)
        wait_for(lambda: mine.count() == slots + WAITING, "A's rows")
        wait_for(lambda: mine.filter(status="running").count() == slots, f"{slots} of A's answers running")
        busy = ttft(stack.url, b_token)
        b_started = RequestLog.objects.filter(user=b).latest("queued_at").started_at
        ahead = mine.filter(started_at__lt=b_started).count() - slots
    finally:
        stack.web.terminate()  # A's clients go; the worker takes no more and lets what runs end (DRAIN_SECONDS)
        stack.web.wait(30)
        stack.stop()
    results = {
        "ttft_b_idle_ms": round(1000 * idle, 1),
        "ttft_b_behind_a_ms": round(1000 * busy, 1),
        "a_running": slots,
        "a_waiting": WAITING,
        "a_waiting_started_before_b": ahead,
    }
    out = BASE_DIR / "bench" / "results"
    out.mkdir(parents=True, exist_ok=True)
    (out / "fairness.json").write_text(json.dumps(results, indent=2) + "\n")
    print()
    print("| fairness | value |")
    print("|---|---|")
    print(f"| B's time to first token, idle deployment | {results['ttft_b_idle_ms']} ms |")
    print(f"| B's time to first token, A running {slots} with {WAITING} waiting | {results['ttft_b_behind_a_ms']} ms |")
    print(f"| A's waiting requests started before B's (target 0) | {ahead} |")


if __name__ == "__main__":
    main()
