"""A worker that stops (Celery's warm shutdown) lets the answers running on it end before its
engines stop: a vLLM engine's processes stopped first would cut every such answer short."""

import threading
import time

from celery.signals import worker_shutdown

from workers import admission, loader


class _Engine:
    """An engine with processes of its own to stop, as vLLM's (workers/engines/vllm_engine.py)."""

    def __init__(self, order: list):
        self.order = order

    def shut_down(self) -> None:
        self.order.append("engine stopped")


def test_the_running_answers_end_before_the_engines_stop(monkeypatch):
    order = []
    admitter = admission.Admitter(["nowhere"])
    admitter.running["some-deployment"] = 1
    monkeypatch.setattr(admission, "_admitters", [admitter])
    monkeypatch.setattr(loader, "BY_MODEL", {("some-model",): _Engine(order)})
    monkeypatch.setattr(loader, "RETIRING", {})

    def answer():
        time.sleep(1)
        order.append("answer ended")
        admitter.running["some-deployment"] -= 1

    thread = threading.Thread(target=answer)
    thread.start()
    worker_shutdown.send(sender=None)  # what Celery sends as the worker stops: every receiver runs
    thread.join()
    assert order == ["answer ended", "engine stopped"]
