"""Prometheus metrics: one ``CollectorRegistry`` per app, every metric named ``embedplex_*``.

The registry is per app (never the process-global one) so tests and embedders can build several
apps in one process. Request metrics are recorded once per HTTP request by the observability
middleware; model metrics once per batch by a ``ModelMetrics`` observer; gauges that describe
current state (queue size, in-flight work, readiness, what is served) are read from the gateway
at scrape time, which keeps them exact and off the hot path: a model no longer served, or a lazy
model's placeholder once it loaded, leaves no series behind. ``docs/observability.md`` lists
every metric.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import Any, Protocol

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    PlatformCollector,
    ProcessCollector,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from embedplex import __version__
from embedplex.core.types import ModelInfo, Timings
from embedplex.observability.key_metrics import KeyMetrics
from embedplex.observability.limits import RateLimitMetrics
from embedplex.observability.loop_metrics import HistogramSeries, LoopHistogram, LoopMetrics
from embedplex.observability.model_metrics import ModelMetrics
from embedplex.observability.providers import ProviderMetrics
from embedplex.observability.ray_metrics import RayMetrics

# Seconds, from half a millisecond (a short tokenization) to a minute (a long queue wait).
DURATION_BUCKETS = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
    60.0,
)  # fmt: skip
# Refused with these statuses, a request counts as a refusal (backpressure), not a fault.
REFUSAL_STATUSES = frozenset({429, 503})
NO_MODEL = "-"  # the model label of requests that failed before a model was chosen
# The model label of a request that named a model not served here, or made an ad-hoc route
# (``providers`` in the body): label values come only from configured names, never a client's.
UNKNOWN_MODEL = "unknown"


class GatewayView(Protocol):
    """What the scrape-time collector reads: the gateway's ``stats()``, ``ready()`` and
    ``models``."""

    def stats(self) -> dict[str, dict[str, Any]]: ...

    def ready(self) -> tuple[bool, str]: ...

    @property
    def models(self) -> list[ModelInfo]: ...


# gateway.stats() key -> (metric name, help)
_STATE_GAUGES = {
    "queued": ("embedplex_queue_size", "Inputs waiting in the model's queue."),
    "active_requests": ("embedplex_requests_in_flight", "Requests being served by the model."),
    "in_flight_batches": ("embedplex_batches_in_flight", "Batches running in the backend."),
    "max_batch_requests": (
        "embedplex_max_batch_size",
        "Current batch size cap (AIMD-adjusted for remote providers).",
    ),
}


class _GatewayCollector(Collector):
    """Reads current state from the gateway when Prometheus scrapes."""

    def __init__(self) -> None:
        self.source: Callable[[], GatewayView | None] = lambda: None

    def collect(self) -> Iterator[Metric]:
        gw = self.source()
        yield from _cache_metrics(getattr(gw, "cache_stats", lambda: None)())
        stats = gw.stats() if gw is not None else {}
        for key, (name, doc) in _STATE_GAUGES.items():
            family = GaugeMetricFamily(name, doc, labels=["model"])
            for model, values in stats.items():
                if key in values:
                    family.add_metric([model], float(values[key]))
            yield family
        ready = GaugeMetricFamily("embedplex_ready", "1 when /health/ready answers 200.")
        ready.add_metric([], 1.0 if gw is not None and gw.ready()[0] else 0.0)
        yield ready
        build = GaugeMetricFamily(
            "embedplex_build_info",
            "Always 1; the labels say what is served.",
            labels=["version", "model", "model_id", "backend", "device", "dtype"],
        )
        for info in gw.models if gw is not None else ():
            labels = [__version__, info.name, info.model_id, info.backend, info.device, info.dtype]
            build.add_metric(labels, 1.0)
        yield build


def _cache_metrics(stats: dict[str, Any] | None) -> Iterator[Metric]:
    """The embedding cache's counts (``cache/embeddings.py``), kept as plain ints there."""
    if stats is None:  # no cache built (an embedded gateway, a test): no families
        return
    models: dict[str, dict[str, int]] = stats["models"]
    hits = CounterMetricFamily(
        "embedplex_cache_hits",
        "Inputs answered from the embedding cache, by tier.",
        labels=["model", "tier"],
    )
    misses = CounterMetricFamily(
        "embedplex_cache_misses",
        "Inputs looked up in the embedding cache and not found.",
        labels=["model"],
    )
    joined = CounterMetricFamily(
        "embedplex_dedupe_joined",
        "Inputs that shared the slot of an identical input already queued or running.",
        labels=["model"],
    )
    refused = CounterMetricFamily(
        "embedplex_cache_redis_refused",
        "Values read from the Redis tier and refused as invalid (answered as misses).",
        labels=["model"],
    )
    for name, c in models.items():
        hits.add_metric([name, "memory"], c["hits_memory"])
        hits.add_metric([name, "redis"], c["hits_redis"])
        misses.add_metric([name], c["misses"])
        joined.add_metric([name], c["dedupe_joined"])
        refused.add_metric([name], c["redis_refused"])
    yield hits
    yield misses
    yield joined
    yield refused
    yield CounterMetricFamily(
        "embedplex_cache_evictions",
        "Entries the embedding cache dropped to stay within cache_max_bytes.",
        value=stats["evictions"],
    )
    yield GaugeMetricFamily(
        "embedplex_cache_bytes", "Bytes held by the embedding cache.", value=stats["bytes"]
    )
    yield GaugeMetricFamily(
        "embedplex_cache_entries", "Entries in the embedding cache.", value=stats["entries"]
    )


EdgeStats = Callable[[], tuple[int, dict[str, int]]]


class _EdgeCollector(Collector):
    """The connection limits' counts (``serve/edge.py``), read when Prometheus scrapes."""

    def __init__(self) -> None:
        self.source: EdgeStats | None = None

    def collect(self) -> Iterator[Metric]:
        if self.source is None:  # not served by ``embedplex serve`` (an embedded app, a test)
            return
        open_now, refusals = self.source()
        yield GaugeMetricFamily(
            "embedplex_connections_open", "Open client connections.", value=open_now
        )
        family = CounterMetricFamily(
            "embedplex_connection_refusals",
            "Connections answered and closed by the connection limits, by reason.",
            labels=["reason"],
        )
        for reason, count in refusals.items():
            family.add_metric([reason], count)
        yield family


class _RequestChildren:
    """The series of one (route, model), bound once: ``labels()`` is not free."""

    __slots__ = ("duration", "success", "total")

    def __init__(self, m: Metrics, route: str, model: str) -> None:
        self.total = m.requests.labels(route, model)
        self.success = m.request_success.labels(route, model)
        self.duration = m.request_duration.labels(route, model)


class Metrics:
    """Every embedplex metric, registered in its own registry."""

    def __init__(self) -> None:
        self.registry = r = CollectorRegistry()
        self.started = time.monotonic()
        labels = ["route", "model"]
        # Updated on every request: loop-only series, no locks (``loop_metrics.py``).
        self._loop = loop = LoopMetrics()
        r.register(loop)
        self.requests = loop.counter("embedplex_requests", "API requests.", labels)
        self.request_success = loop.counter(
            "embedplex_request_success", "API requests answered 2xx/3xx.", labels
        )
        self.request_failures = Counter(
            "embedplex_request_failures",
            "API requests that failed, by error type.",
            [*labels, "error_type"],
            registry=r,
        )
        self.request_duration = loop.histogram(
            "embedplex_request_duration_seconds",
            "Time from request start until the response was sent.",
            labels,
            DURATION_BUCKETS,
        )
        self.refusals = Counter(
            "embedplex_refusals",
            "Requests refused with 429 (overloaded) or 503 (queue timeout, not ready).",
            ["model", "status"],
            registry=r,
        )
        self.tokenization_duration = self._stage("tokenization", "Tokenizing one request.")
        self.queue_duration = self._stage("queue", "Queue wait of one request's slowest input.")
        self.inference_duration = self._stage(
            "inference", "Inference (or upstream call) time of one request's slowest input."
        )
        self.model_metrics = ModelMetrics.define(r)
        self.providers = ProviderMetrics(r)
        self.rate_limits = RateLimitMetrics(r)
        self.keys = KeyMetrics(r)
        self.ray = RayMetrics(r)
        uptime = Gauge("embedplex_uptime_seconds", "Seconds since the app started.", registry=r)
        uptime.set_function(lambda: time.monotonic() - self.started)
        ProcessCollector(namespace="embedplex", registry=r)  # memory, CPU, open fds, start time
        PlatformCollector(registry=r)
        self._gateway = _GatewayCollector()
        r.register(self._gateway)
        self._edge = _EdgeCollector()
        r.register(self._edge)
        self._children: dict[tuple[str, str], _RequestChildren] = {}
        self._stages: dict[str, tuple[HistogramSeries, HistogramSeries, HistogramSeries]] = {}
        self._models: dict[str, ModelMetrics] = {}

    def _stage(self, stage: str, doc: str) -> LoopHistogram:
        return self._loop.histogram(
            f"embedplex_{stage}_duration_seconds", doc, ["model"], DURATION_BUCKETS
        )

    def watch(self, source: Callable[[], GatewayView | None]) -> None:
        """Read queue and in-flight gauges, readiness and build info from ``source()`` at
        scrape time."""
        self._gateway.source = source

    def watch_edge(self, source: EdgeStats) -> None:
        """Report open connections and connection refusals from ``source()`` at scrape time."""
        self._edge.source = source

    def model(self, name: str) -> ModelMetrics:
        """The batch observer of one model or provider (one per name)."""
        if name not in self._models:
            self._models[name] = ModelMetrics(self.model_metrics, name)
        return self._models[name]

    def observe_request(
        self,
        route: str,
        model: str,
        status: int,
        duration: float,
        *,
        error_type: str | None = None,
        timings: Timings | None = None,
    ) -> None:
        """Record one finished API request (called by the pipeline's observer, on the loop)."""
        children = self._children.get((route, model))
        if children is None:
            children = self._children[(route, model)] = _RequestChildren(self, route, model)
        children.total.inc()
        children.duration.observe(duration)
        if status < 400:
            children.success.inc()
        else:
            self.request_failures.labels(route, model, error_type or f"http_{status}").inc()
            if status in REFUSAL_STATUSES:
                self.refusals.labels(model, str(status)).inc()
        if timings is not None:
            tok, queue, infer = self._stage_children(model)
            tok.observe(timings.tokenization / 1000)
            queue.observe(timings.queue / 1000)
            infer.observe(timings.inference / 1000)

    def _stage_children(
        self, model: str
    ) -> tuple[HistogramSeries, HistogramSeries, HistogramSeries]:
        stages = self._stages.get(model)
        if stages is None:
            stages = self._stages[model] = (
                self.tokenization_duration.labels(model),
                self.queue_duration.labels(model),
                self.inference_duration.labels(model),
            )
        return stages

    def failures_by_type(self, model: str) -> dict[str, int]:
        """Failed requests of one model so far, by error type (for ``/api/v1/status``)."""
        out: dict[str, int] = {}
        for metric in self.request_failures.collect():
            for sample in metric.samples:
                if sample.name.endswith("_total") and sample.labels["model"] == model:
                    kind = sample.labels["error_type"]
                    out[kind] = out.get(kind, 0) + int(sample.value)
        return out

    def render(self) -> bytes:
        """The text exposition format, for ``GET /metrics``."""
        return generate_latest(self.registry)
