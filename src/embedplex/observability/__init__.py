"""Observability: Prometheus metrics, OpenTelemetry spans, and the hooks models report to."""

from embedplex.observability.metrics import Metrics
from embedplex.observability.model_metrics import ModelMetrics, RecentBatches
from embedplex.observability.providers import (
    CircuitState,
    NullProviderObserver,
    ProviderMetrics,
    ProviderObserver,
)
from embedplex.observability.telemetry import Instrumentable, Telemetry
from embedplex.observability.tracing import upstream_span

__all__ = [
    "CircuitState",
    "Instrumentable",
    "Metrics",
    "ModelMetrics",
    "NullProviderObserver",
    "ProviderMetrics",
    "ProviderObserver",
    "RecentBatches",
    "Telemetry",
    "upstream_span",
]
