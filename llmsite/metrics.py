"""Prometheus metrics (README, "Metrics"): their definitions, who may read them, and the web tier's
`/metrics`.

Names follow vLLM's where the meaning is the same, with `llmsite:` for `vllm:`; every series is
labelled by `deployment` and `worker`. Each process counts what it sees: the web tier the
requests it refused (and the streams it ended itself), each worker the generations it ran and its
engines' state (`workers/metrics.py`, served on WORKER_METRICS_PORT). The web tier also reports
the request rows in flight, read from the database when scraped.
"""

import hmac
import ipaddress
import logging
import threading
from functools import lru_cache

import prometheus_client
from django.conf import settings
from django.http import HttpResponse
from prometheus_client import REGISTRY, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily

from llmsite.errors import ApiError

log = logging.getLogger(__name__)

prometheus_client.disable_created_metrics()  # no `_created` series beside every counter and histogram

LABELS = ("deployment", "worker")
OUTCOMES = ("finished", "stopped", "error", "rejected")
REASONS = ("invalid_request", "authentication", "permission", "rate_limited", "quota", "overloaded", "too_large")

# vLLM's buckets, with a few shorter ones (tokens on a CPU come every few milliseconds).
_TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0)
_ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0)
_REQUEST_BUCKETS = (0.01, 0.05, 0.1, 0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0, 480.0, 960.0, 1920.0)

REQUESTS = Counter(
    "llmsite:requests",
    "Generation requests by how they ended: finished, stopped (cancelled: Stop or the client left), "
    "error, or rejected before any model work (reason: " + ", ".join(REASONS) + ").",
    [*LABELS, "outcome", "reason"],
)
TIME_TO_FIRST_TOKEN = Histogram(
    "llmsite:time_to_first_token_seconds",
    "Time from the web tier sending a request to its first token on the worker.",
    LABELS,
    buckets=_TTFT_BUCKETS,
)
INTER_TOKEN_LATENCY = Histogram(
    "llmsite:inter_token_latency_seconds",
    "Time between two tokens of an answer: each token after the first is one observation of its "
    "request's mean gap (the worker sees tokens in paced pieces, not one by one).",
    LABELS,
    buckets=_ITL_BUCKETS,
)
E2E_LATENCY = Histogram(
    "llmsite:e2e_request_latency_seconds",
    "Time from the web tier sending a request to its end on the worker (any outcome).",
    LABELS,
    buckets=_REQUEST_BUCKETS,
)
QUEUE_TIME = Histogram(
    "llmsite:request_queue_time_seconds",
    "Time from the web tier sending a request to a worker claiming it (the broker's queue; "
    "waiting for a place in the engine's batch shows in the time to the first token).",
    LABELS,
    buckets=_REQUEST_BUCKETS,
)
PROMPT_TOKENS = Counter("llmsite:prompt_tokens", "Prompt tokens of the requests a worker ran.", LABELS)
GENERATION_TOKENS = Counter("llmsite:generation_tokens", "Tokens generated.", LABELS)
PREFIX_CACHE_HITS = Counter(
    "llmsite:prefix_cache_hits",
    "Prompt tokens whose KV rows an engine had cached (not computed again); the hit rate is this over prompt_tokens.",
    LABELS,
)


def count(*, deployment: str, worker: str, outcome: str, reason: str = "") -> None:
    REQUESTS.labels(deployment, worker, outcome, reason).inc()


def refused(exc: ApiError, *, deployment: str = "") -> None:
    """Count a generation request the web tier refused (once, however many edges it passes):
    `rejected` with the error's reason, or `error` for a server error. `deployment` only where
    the edge resolved it (a name from the URL or the body could be anything)."""
    if exc.counted:
        return
    exc.counted = True
    outcome = "rejected" if exc.reason else "error"
    count(deployment=exc.deployment or deployment, worker="", outcome=outcome, reason=exc.reason or "")


# --- who may read them -----------------------------------------------------------------------


@lru_cache(maxsize=4)
def _networks(cidrs: tuple[str, ...]) -> tuple:
    return tuple(ipaddress.ip_network(c.strip(), strict=False) for c in cidrs if c.strip())


def allowed(*, remote_addr: str | None, authorization: str | None) -> bool:
    """A caller from METRICS_ALLOWED_NETWORKS, or one sending `Authorization: Bearer <METRICS_TOKEN>`."""
    token = settings.METRICS_TOKEN
    if token and authorization:
        scheme, _, value = authorization.strip().partition(" ")
        if scheme.lower() == "bearer" and hmac.compare_digest(value.strip().encode(), token.encode()):
            return True
    try:
        address = ipaddress.ip_address((remote_addr or "").split("%")[0])
    except ValueError:
        return False
    if getattr(address, "ipv4_mapped", None) is not None:
        address = address.ipv4_mapped  # ::ffff:127.0.0.1 on a dual-stack socket
    return any(address in network for network in _networks(tuple(settings.METRICS_ALLOWED_NETWORKS)))


FORBIDDEN = b"403 Forbidden: /metrics answers METRICS_ALLOWED_NETWORKS, or Authorization: Bearer <METRICS_TOKEN>.\n"


# --- the web tier's endpoint -----------------------------------------------------------------


class RequestRows:
    """`llmsite:requests_in_flight`: request rows queued (sent, no worker took them yet) and running
    (claimed by `worker`), per deployment, read from the database at each scrape. Every web
    process reports the same rows: aggregate them with max(), not sum()."""

    name = "llmsite:requests_in_flight"
    help = "Requests stored as queued (waiting for a worker) or running (claimed by a worker), from the request rows."

    def _family(self) -> GaugeMetricFamily:
        return GaugeMetricFamily(self.name, self.help, labels=[*LABELS, "status"])

    def describe(self):
        return [self._family()]  # registering it runs no query

    def collect(self):
        from django.db import DatabaseError
        from django.db.models import Count

        from chat.models import Deployment, RequestLog

        family = self._family()
        try:
            counts = {(name, "", status): 0 for name in Deployment.objects.filter(enabled=True).values_list("name", flat=True) for status in ("queued", "running")}
            rows = (
                RequestLog.objects.filter(status__in=("queued", "running"), deployment__isnull=False)
                .values_list("deployment__name", "worker", "status")
                .annotate(n=Count("id"))
                .order_by()  # the model's ordering would split the groups
            )
            for name, worker, status, n in rows:
                counts[(name, worker, status)] = n
        except DatabaseError:
            log.warning("/metrics: the request rows could not be read", exc_info=True)
            return []
        for labels, value in sorted(counts.items()):
            family.add_metric(list(labels), value)
        return [family]


_rows = RequestRows()
_registered: list = []
_register_lock = threading.Lock()


def register_once(collector) -> None:
    """Add a collector to this process's registry (the web tier's rows, a worker's engines) once."""
    with _register_lock:
        if collector not in _registered:
            REGISTRY.register(collector)
            _registered.append(collector)


def metrics_view(request):
    """`GET /metrics`: the web process's metrics in Prometheus' text format, for allowed callers."""
    if not allowed(remote_addr=request.META.get("REMOTE_ADDR"), authorization=request.headers.get("Authorization")):
        return HttpResponse(FORBIDDEN, status=403, content_type="text/plain; charset=utf-8")
    register_once(_rows)  # the web tier's only: a worker reports its engines instead
    body = prometheus_client.generate_latest(REGISTRY)
    return HttpResponse(body, content_type=prometheus_client.CONTENT_TYPE_LATEST)
