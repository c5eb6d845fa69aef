"""A worker's metrics (README, "Metrics"): what its generations observed (`Timing`, used by
workers/services.py), its engines' state read at each scrape (`Engines`), and the worker's own
/metrics server on WORKER_METRICS_PORT: Celery workers on many nodes share no registry, so each
serves its own, under the same access rule as the web tier's (llmsite.metrics.allowed).

What each engine reports: the llama.cpp and transformers engines their batch (running), their
waiting queue and their batch's capacity; the llama.cpp engine also the share of its decoding
context's KV cells that running requests hold (the transformers engine's cache grows on demand:
no fixed size to be a share of). The vLLM adapter reports only its load state: vLLM itself
registers its own `vllm:*` metrics (running, waiting, KV cache use) in the same registry when
its stat logging is on, and they are served beside these.
"""

import logging
import socket
import threading
import time
from wsgiref.simple_server import WSGIRequestHandler, make_server

from django.conf import settings
from prometheus_client import REGISTRY, make_wsgi_app
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.exposition import ThreadingWSGIServer

from llmsite import metrics
from llmsite.contract import GenerationRequest
from workers import loader

log = logging.getLogger(__name__)

LOAD_STATES = ("loading", "ready", "failed")


def count(*, deployment: str, outcome: str, reason: str = "") -> None:
    metrics.count(deployment=deployment, worker=loader.HOSTNAME, outcome=outcome, reason=reason)


class Timing:
    """One generation's clock from its claim on; its observations go to llmsite.metrics.

    Intervals are read on this process's monotonic clock; only the queue time compares the web
    tier's clock (`sent_at`) with this one's (clamped at 0). Without `sent_at` (an older web
    tier) the queue time is not observed and the other times start at the claim."""

    def __init__(self, request: GenerationRequest):
        self.deployment = request.deployment
        self.labels = (request.deployment, loader.HOSTNAME)
        self.claimed = time.monotonic()
        self.queued = 0.0
        if request.sent_at is not None:
            self.queued = max(0.0, time.time() - request.sent_at)
            metrics.QUEUE_TIME.labels(*self.labels).observe(self.queued)
        self.first_token: float | None = None

    def _since_sent(self, moment: float) -> float:
        return self.queued + moment - self.claimed

    def first(self) -> None:
        """The answer's first token arrived."""
        self.first_token = time.monotonic()
        metrics.TIME_TO_FIRST_TOKEN.labels(*self.labels).observe(self._since_sent(self.first_token))

    def end(self, result, *, outcome: str, reason: str = "") -> None:
        """The generation ended (`result`: its GenerationResult, filled as far as it got)."""
        now = time.monotonic()
        count(deployment=self.deployment, outcome=outcome, reason=reason)
        metrics.E2E_LATENCY.labels(*self.labels).observe(self._since_sent(now))
        metrics.PROMPT_TOKENS.labels(*self.labels).inc(result.prompt_tokens)
        metrics.GENERATION_TOKENS.labels(*self.labels).inc(result.completion_tokens)
        metrics.PREFIX_CACHE_HITS.labels(*self.labels).inc(result.cached_tokens)
        gaps = result.completion_tokens - 1
        if self.first_token is not None and gaps > 0:
            histogram, mean = metrics.INTER_TOKEN_LATENCY.labels(*self.labels), (now - self.first_token) / gaps
            for _ in range(gaps):  # one observation per token after the first, as vLLM counts them
                histogram.observe(mean)


class Engines:
    """The engines' gauges, read from workers.loader at each scrape (no call threads through an
    engine). Deployments that share one loaded model share its engine: each reports its numbers."""

    def _families(self) -> dict[str, GaugeMetricFamily]:
        labels = list(metrics.LABELS)
        return {
            "running": GaugeMetricFamily("llmsite:num_requests_running", "Requests in the engine's batch (its batch size now).", labels=labels),
            "waiting": GaugeMetricFamily("llmsite:num_requests_waiting", "Requests this worker took that wait for a place in the engine's batch.", labels=labels),
            "capacity": GaugeMetricFamily("llmsite:engine_max_batch_size", "The most requests the engine's batch takes.", labels=labels),
            "kv": GaugeMetricFamily("llmsite:kv_cache_usage_perc", "Share of the engine's KV cache in use (0-1), where it has a fixed one.", labels=labels),
            "load": GaugeMetricFamily(
                "llmsite:model_load_state", "1 for the deployment's model load state on this worker (loading, ready, failed).", labels=[*labels, "state"]
            ),
        }

    def describe(self):
        return list(self._families().values())  # registering it reads nothing

    def collect(self):
        families, worker = self._families(), loader.HOSTNAME
        engines, failed, loading = dict(loader.ENGINES), dict(loader.FAILED), set(loader.LOADING)
        for name, engine in sorted(engines.items()):
            scheduler = getattr(engine, "scheduler", None)
            if scheduler is None:
                continue  # vLLM: its own vllm:* gauges
            families["running"].add_metric([name, worker], scheduler.running)
            families["waiting"].add_metric([name, worker], scheduler.waiting)
            families["capacity"].add_metric([name, worker], scheduler.max_batch_size)
            usage = scheduler.kv_cache_usage()
            if usage is not None:
                families["kv"].add_metric([name, worker], usage)
        for name in sorted(set(engines) | set(failed) | loading):
            state = "loading" if name in loading else "failed" if name in failed else "ready"
            for each in LOAD_STATES:
                families["load"].add_metric([name, worker, each], 1.0 if each == state else 0.0)
        return list(families.values())


_engines = Engines()


class _Quiet(WSGIRequestHandler):
    def log_message(self, format, *args):
        """A scrape every few seconds is not worth a log line."""


def _guarded(app):
    """Prometheus' WSGI app at /metrics, for callers llmsite.metrics.allowed lets in (else 403)."""

    def guarded(environ, start_response):
        text = [("Content-Type", "text/plain; charset=utf-8")]
        if environ.get("PATH_INFO") != "/metrics":
            start_response("404 Not Found", text)
            return [b"Not found: the metrics are at /metrics.\n"]
        if not metrics.allowed(remote_addr=environ.get("REMOTE_ADDR"), authorization=environ.get("HTTP_AUTHORIZATION")):
            start_response("403 Forbidden", text)
            return [metrics.FORBIDDEN]
        return app(environ, start_response)

    return guarded


def serve(*, host: str, port: int) -> ThreadingWSGIServer:
    """Serve this process's registry (with the engines' gauges) at http://host:port/metrics from a
    daemon thread; OSError when the port is taken."""
    metrics.register_once(_engines)
    family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0][0]
    server_class = type("MetricsServer", (ThreadingWSGIServer,), {"address_family": family})
    httpd = make_server(host, port, _guarded(make_wsgi_app(REGISTRY)), server_class, handler_class=_Quiet)
    threading.Thread(target=httpd.serve_forever, name="metrics-server", daemon=True).start()
    return httpd


def start() -> None:
    """The worker's /metrics on WORKER_METRICS_HOST:WORKER_METRICS_PORT (nothing when the port is
    unset). A port that is taken is logged, and the worker serves its queues without metrics."""
    host, port = settings.WORKER_METRICS_HOST, settings.WORKER_METRICS_PORT
    if not port:
        return
    try:
        serve(host=host, port=port)
    except OSError as exc:
        log.error("worker metrics: cannot listen on %s:%s (%s); this worker serves no /metrics", host, port, exc)
        return
    log.info("worker metrics at http://%s:%s/metrics", host, port)
