"""The loop-only series expose exactly what prometheus_client's own Counter and Histogram do."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest

from embedplex.observability.loop_metrics import LoopMetrics
from embedplex.observability.metrics import DURATION_BUCKETS

# On a bound, between bounds, below the first and past the last: each lands where prometheus
# puts it ("value <= upper bound").
VALUES = (0.0, 0.0005, 0.0007, 0.01, 0.010001, 2.5, 59.9, 60.0, 61.0, 1e9)


def _samples(registry: CollectorRegistry) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in registry.collect()
        for s in family.samples
        if not s.name.endswith("_created")  # creation times differ by when each was made
    }


def test_same_samples_as_prometheus_client() -> None:
    ours, theirs = CollectorRegistry(), CollectorRegistry()
    loop = LoopMetrics()
    ours.register(loop)
    labels = ["route", "model"]
    counter = loop.counter("t_requests", "Requests.", labels)
    histogram = loop.histogram("t_seconds", "Seconds.", labels, DURATION_BUCKETS)
    ref_counter = Counter("t_requests", "Requests.", labels, registry=theirs)
    ref_histogram = Histogram(
        "t_seconds", "Seconds.", labels, buckets=DURATION_BUCKETS, registry=theirs
    )
    for i, value in enumerate(VALUES):
        route = "/a" if i % 3 else "/b"
        counter.labels(route, "m").inc()
        ref_counter.labels(route, "m").inc()
        histogram.labels(route, "m").observe(value)
        ref_histogram.labels(route, "m").observe(value)

    assert _samples(ours) == _samples(theirs)
    text = generate_latest(ours).decode()
    assert 't_seconds_bucket{le="+Inf",model="m",route="/a"}' in text
    assert "t_requests_created" in text and "t_seconds_created" in text


def test_labels_bind_one_series_each() -> None:
    loop = LoopMetrics()
    counter = loop.counter("t", "T.", ["model"])
    assert counter.labels("a") is counter.labels("a")
    assert counter.labels("a") is not counter.labels("b")
