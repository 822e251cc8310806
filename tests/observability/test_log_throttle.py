"""A library that logs every failed attempt (OpenTelemetry's exporters, with the collector
down) gets a line a minute per kind, and only while spans are exported."""

from __future__ import annotations

import logging
from collections.abc import Iterator

import pytest

from embedplex.config import Settings
from embedplex.observability.log_throttle import OncePerInterval
from embedplex.observability.tracing import build_tracer_provider


def _record(name: str, msg: str, *args: object, level: int = logging.WARNING) -> logging.LogRecord:
    return logging.LogRecord(name, level, __file__, 1, msg, args, None)


def test_one_record_of_a_kind_per_interval_then_the_count_held_back() -> None:
    now = [0.0]
    throttle = OncePerInterval(interval_s=60, clock=lambda: now[0])
    exporter = "opentelemetry.exporter.otlp.proto.http.trace_exporter"
    template = "Transient error %s encountered while exporting span batch, retrying in %.2fs."
    passed = []
    for second in range(0, 130, 2):  # a failed export every 2 s for over two minutes
        now[0] = float(second)
        record = _record(exporter, template, "Connection refused", 1.0)
        if throttle.filter(record):
            passed.append(record.getMessage())
    assert len(passed) == 3  # at 0 s, 60 s and 120 s
    assert passed[0].endswith("retrying in 1.00s.")
    assert passed[1].endswith("(29 more like it in the last 60 s not logged)")
    assert "Connection refused" in passed[1]  # the message itself is kept, args applied
    # Another kind (another template or level) is its own; other loggers are never held.
    assert throttle.filter(_record(exporter, "Failed to export span batch code: %s", 503))
    assert throttle.filter(_record(exporter, template, "x", 1.0, level=logging.ERROR))
    assert all(throttle.filter(_record("embedplex.api", "refused %d", n)) for n in range(5))


@pytest.fixture
def root_handler() -> Iterator[logging.Handler]:
    root = logging.getLogger()
    handler = logging.NullHandler()
    root.addHandler(handler)
    yield handler
    root.removeHandler(handler)


def test_only_a_server_that_exports_spans_filters_its_log(root_handler: logging.Handler) -> None:
    assert build_tracer_provider(Settings()) is None
    assert not root_handler.filters  # no tracing: no per-line cost
    provider = build_tracer_provider(Settings(otlp_endpoint="http://127.0.0.1:9"))
    assert provider is not None
    try:
        assert [type(f) for f in root_handler.filters] == [OncePerInterval]
        again = build_tracer_provider(Settings(otlp_endpoint="http://127.0.0.1:9"))
        assert again is not None and len(root_handler.filters) == 1  # once per handler
        again.shutdown()
    finally:
        provider.shutdown()
