"""``Telemetry``: the metrics and the tracer of one app, and how served models plug into them.

The app builds one ``Telemetry`` and calls ``instrument(gateway)`` before the gateway starts;
each served model that is ``Instrumentable`` then takes its batch observers and the tracer.
Remote provider adapters (the router) also get ``telemetry.providers``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol, runtime_checkable

from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SpanExporter
from opentelemetry.trace import Tracer

from embedplex import __version__
from embedplex.batching import BatchObserver
from embedplex.core.types import ServedModel
from embedplex.observability.metrics import Metrics
from embedplex.observability.providers import ProviderObserver
from embedplex.observability.tracing import BatchSpans, build_tracer_provider, shutdown_spans

if TYPE_CHECKING:
    # Annotations only: observability sits below the configuration, which imports the
    # providers, which report here.
    from embedplex.config import Settings


@runtime_checkable
class Instrumentable(Protocol):
    """A served model that takes observers and a tracer (before it starts)."""

    def instrument(self, telemetry: Telemetry) -> None: ...


class Telemetry:
    """Metrics (always on, per-app registry) and spans (off unless configured)."""

    def __init__(self, metrics: Metrics, tracer_provider: TracerProvider | None = None) -> None:
        self.metrics = metrics
        self.tracer_provider = tracer_provider
        self.tracer: Tracer | None = (
            tracer_provider.get_tracer("embedplex", __version__) if tracer_provider else None
        )

    @classmethod
    def from_settings(
        cls, settings: Settings, *, span_exporter: SpanExporter | None = None
    ) -> Telemetry:
        return cls(Metrics(), build_tracer_provider(settings, span_exporter))

    @property
    def providers(self) -> ProviderObserver:
        """Where remote provider adapters report upstream calls, retries, circuit, AIMD."""
        return self.metrics.providers

    def model_observers(self, name: str) -> list[BatchObserver]:
        """Batch observers for the batcher of model (or provider) ``name``."""
        observers: list[BatchObserver] = [self.metrics.model(name)]
        if self.tracer is not None:
            observers.append(BatchSpans(self.tracer, name))
        return observers

    def instrument(self, services: list[ServedModel]) -> None:
        """Hook every served model up; call before the models start."""
        for service in services:
            if isinstance(service, Instrumentable):
                service.instrument(self)

    async def aclose(self) -> None:
        """Flush and stop span export, waiting a bounded time (``shutdown_spans``)."""
        if self.tracer_provider is not None:
            await shutdown_spans(self.tracer_provider)
