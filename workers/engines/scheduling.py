"""What the engines' schedulers share, without torch: the request inside an engine (`BatchRequest`)
and the scheduler thread (`Scheduler`): its loop, the waiting queue, submit/abort/stop from any
thread, and how a token reaches its request. Subclasses hold the model and its batch: the
transformers scheduler (batching.py) and the llama.cpp one (llamacpp/scheduler.py)."""

from __future__ import annotations

import logging
import queue
import threading
from collections import deque
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger(__name__)

# what a request gets from an engine closed after it took it (its deployment changed: workers/reload.py)
CLOSED = "the deployment's model was changed or disabled while this request started; send it again"


class EngineClosed(RuntimeError):
    """The engine a request took was closed before it started the request (its deployment was
    changed or disabled in that instant): nothing was generated, so the worker sends the request
    to the deployment's new engine (workers/services.py)."""

    def __init__(self):
        super().__init__(CLOSED)


# The token an engine chooses for a row whose logits are no use (NaN, or no finite best): the
# request ends with NOT_A_NUMBER_ERROR instead of a garbage token (and is never fed back as input).
NOT_A_NUMBER = -1
NOT_A_NUMBER_ERROR = (
    "the model's scores for the next token are not numbers (NaN or infinite logits): its weights are broken, "
    "or its precision overflows on this input (float16 does in some models; try bfloat16 or float32)"
)


@dataclass
class BatchRequest:
    """A request inside the engine; `out` receives ("token", id) ... then ("done", reason) or ("error", msg);
    ("closed", None) alone where its engine was closed before it started (EngineClosed)."""

    id: str
    prompt_ids: list[int]
    max_new_tokens: int
    greedy: bool
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None
    stop_ids: frozenset = frozenset()
    out: queue.Queue = field(default_factory=queue.Queue)
    # engine state
    generated: int = 0
    cached_tokens: int = 0  # prompt tokens not computed (a cache had their KV rows)
    cache_scope: str = ""  # KV rows kept for this request serve only requests of the same scope
    cache: Any = None  # the transformers scheduler's DynamicCache of a long prompt being prefilled
    prefilled: int = 0
    generator: Any = None  # a torch.Generator, made where the request is sampled (on the host where it names a seed)
    draws: Any = None  # a seeded request's next uniform numbers, drawn ahead on the host (batch_sampling)
    drawn: int = 0  # how many of them it has used
    policy: Any = None  # its sampling.TokenPolicy (penalties, logit_bias, logprobs, grammar); None: none of them


class Rows:
    """The running requests of a batch, row by row; a finished row is None until compacted away
    (the transformers engine's two batch layouts share this)."""

    requests: list[BatchRequest | None]

    @property
    def alive(self) -> int:
        return sum(r is not None for r in self.requests)

    @property
    def dead(self) -> int:
        return len(self.requests) - self.alive

    def finish(self, rows: list[int]) -> None:
        for row in rows:
            self.requests[row] = None


class Scheduler:
    """Runs the engine loop in one thread; `submit()` and `abort()` are safe from any thread.

    A subclass sets up its own state, then calls this `__init__` (which starts the thread), and
    implements `step`, `running`, `_has_work`, `_remaining`, `_drop_aborted` and `_fail_all`."""

    def __init__(self, *, max_batch_size: int = 32, name: str = "engine"):
        self.max_batch_size = max_batch_size
        self._waiting: deque[BatchRequest] = deque()
        self._aborted: set[str] = set()
        self._wake = threading.Condition()
        self._stopped = False
        self._retiring = False  # stop at the first moment with no request (retire)
        self.steps = 0
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self._thread.start()

    # --- from any thread -----------------------------------------------------------------
    def submit(self, request: BatchRequest) -> None:
        with self._wake:
            if self._stopped:  # its engine was closed (workers/reload.py) after the request took it
                request.out.put(("closed", None))
                return
            self._waiting.append(request)
            self._wake.notify()

    def abort(self, request_id: str) -> None:
        with self._wake:
            self._aborted.add(request_id)
            self._wake.notify()

    def stop(self) -> None:
        """End the engine loop (requests still inside get a "cancelled" finish)."""
        with self._wake:
            self._stopped = True
            self._wake.notify()
        self._thread.join(30)

    def retire(self, timeout: float) -> bool:
        """End the engine loop at its first moment with no request, waiting or running (its
        engine is being replaced): the requests inside run to their end, and one submitted after
        gets an error at once (the loop decides under the lock `submit` takes, so none falls
        between). Whether its thread has ended within `timeout` seconds."""
        with self._wake:
            self._retiring = True
            self._wake.notify()
        self._thread.join(timeout)
        return not self._thread.is_alive()

    @property
    def running(self) -> int:
        """How many requests are inside the engine (not waiting)."""
        raise NotImplementedError

    @property
    def waiting(self) -> int:
        """How many requests wait to join the batch (read by /metrics from its own thread)."""
        return len(self._waiting)

    def kv_cache_usage(self) -> float | None:
        """The share of the engine's KV cache in use, where it has a fixed one (None: it grows on demand)."""
        return None

    # --- the engine thread ---------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            with self._wake:
                while not self._stopped and not self._has_work():
                    if self._retiring:
                        self._stopped = True
                        break
                    self._wake.wait()
                if self._stopped:
                    break
                aborted, self._aborted = self._aborted, set()
            try:
                self._drop_aborted(aborted)
                self.step()
            except Exception as exc:  # a broken step fails the requests in it, not the worker
                log.exception("engine step failed")
                self._fail_all(f"{type(exc).__name__}: {exc}")
        with self._wake:
            everyone = list(self._waiting) + self._remaining()
            self._waiting.clear()
        for request in everyone:
            request.out.put(("done", "cancelled"))

    def step(self) -> None:
        """One iteration of the engine: requests join, and every running request gets a token."""
        raise NotImplementedError

    def _has_work(self) -> bool:
        raise NotImplementedError

    def _remaining(self) -> list[BatchRequest]:
        """The requests inside the engine (not waiting), told "cancelled" when it stops."""
        raise NotImplementedError

    def _drop_aborted(self, aborted: set[str]) -> None:
        """Aborted requests leave, waiting or running, with a "cancelled" finish."""
        raise NotImplementedError

    def _fail_all(self, message: str) -> None:
        """A step failed: every request inside the engine gets the error, and the batch is empty."""
        raise NotImplementedError

    def _drop_waiting(self, aborted: set[str]) -> None:
        """Aborted requests that never started leave the queue with a "cancelled" finish."""
        with self._wake:
            for request in [r for r in self._waiting if r.id in aborted]:
                self._waiting.remove(request)
                request.out.put(("done", "cancelled"))

    @staticmethod
    def _emit(request: BatchRequest, token: int) -> bool:
        """Hand the token to the request; True when the request is finished."""
        if token == NOT_A_NUMBER:
            request.out.put(("error", NOT_A_NUMBER_ERROR))
            return True
        if token in request.stop_ids:
            request.out.put(("done", "stop"))
            return True
        request.generated += 1
        request.out.put(("token", token))
        if request.policy is not None and request.policy.ended:
            request.out.put(("done", "grammar"))  # the grammar is complete: a "stop" without an end token
            return True
        if request.generated >= request.max_new_tokens:
            request.out.put(("done", "length"))
            return True
        return False
