"""Metrics for remote providers: the API the router's adapters call.

A provider adapter gets a ``ProviderObserver`` (``Telemetry.providers``) and reports each upstream
call, each retry, circuit breaker transitions and its AIMD batch size. The inputs-per-call
histogram is the compression ratio: how many client inputs one upstream request carried.
Batches of a provider's batcher are recorded by the same ``ModelMetrics`` observer as local
models (``Telemetry.model_observers(provider_name)``).
"""

from __future__ import annotations

from enum import IntEnum
from typing import Any, Protocol

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from embedplex.observability.model_metrics import BATCH_DURATION_BUCKETS, SIZE_BUCKETS


class CircuitState(IntEnum):
    """Circuit breaker states, as the ``embedplex_circuit_state`` gauge reports them."""

    CLOSED = 0
    HALF_OPEN = 1
    OPEN = 2


class ProviderObserver(Protocol):
    """Hooks for remote provider adapters; every method must be cheap and must not raise."""

    def on_upstream_call(self, provider: str, n_inputs: int, duration: float, status: str) -> None:
        """One HTTP call to the upstream finished.

        ``status`` is the HTTP status as text ("200", "429") or a transport failure
        ("timeout", "connect_error").
        """

    def on_retry(self, provider: str, reason: str) -> None:
        """A failed upstream call is about to be retried; ``reason`` as in ``status``."""

    def on_circuit_state(self, provider: str, state: CircuitState) -> None:
        """The provider's circuit breaker moved to ``state``."""

    def on_batch_size(self, provider: str, size: int) -> None:
        """AIMD set the provider's batch size to ``size``."""

    def forget(self, provider: str) -> None:
        """The provider was removed: its current-state series go (its counts stay)."""


class NullProviderObserver:
    """Ignores everything (the default of adapters built without telemetry)."""

    def on_upstream_call(self, provider: str, n_inputs: int, duration: float, status: str) -> None:
        pass

    def on_retry(self, provider: str, reason: str) -> None:
        pass

    def on_circuit_state(self, provider: str, state: CircuitState) -> None:
        pass

    def on_batch_size(self, provider: str, size: int) -> None:
        pass

    def forget(self, provider: str) -> None:
        pass


class ProviderMetrics:
    """The Prometheus ``ProviderObserver``; its metrics live in the app's registry."""

    def __init__(self, registry: CollectorRegistry) -> None:
        r = registry
        self.calls = Counter(
            "embedplex_upstream_requests",
            "Calls to remote providers, by status.",
            ["provider", "status"],
            registry=r,
        )
        self.duration = Histogram(
            "embedplex_upstream_duration_seconds",
            "Duration of one upstream call.",
            ["provider"],
            buckets=BATCH_DURATION_BUCKETS,
            registry=r,
        )
        self.inputs_per_call = Histogram(
            "embedplex_upstream_inputs_per_call",
            "Client inputs carried by one upstream call (compression ratio).",
            ["provider"],
            buckets=SIZE_BUCKETS,
            registry=r,
        )
        self.inputs = Counter(
            "embedplex_upstream_inputs", "Inputs sent upstream.", ["provider"], registry=r
        )
        self.retries = Counter(
            "embedplex_upstream_retries",
            "Upstream calls retried, by reason.",
            ["provider", "reason"],
            registry=r,
        )
        self.circuit = Gauge(
            "embedplex_circuit_state",
            "Circuit breaker state: 0 closed, 1 half-open, 2 open.",
            ["provider"],
            registry=r,
        )
        self.batch_size = Gauge(
            "embedplex_aimd_batch_size",
            "Batch size the AIMD controller currently allows.",
            ["provider"],
            registry=r,
        )

        # Label children bound once per provider (and status): ``labels()`` is not free.
        self._per_provider: dict[str, _ProviderChildren] = {}
        self._calls: dict[tuple[str, str], Any] = {}
        self._retries: dict[tuple[str, str], Any] = {}

    def _children(self, provider: str) -> _ProviderChildren:
        children = self._per_provider.get(provider)
        if children is None:
            children = self._per_provider[provider] = _ProviderChildren(self, provider)
        return children

    def on_upstream_call(self, provider: str, n_inputs: int, duration: float, status: str) -> None:
        calls = self._calls.get((provider, status))
        if calls is None:
            calls = self._calls[(provider, status)] = self.calls.labels(provider, status)
        calls.inc()
        children = self._children(provider)
        children.duration.observe(duration)
        children.inputs_per_call.observe(n_inputs)
        children.inputs.inc(n_inputs)

    def on_retry(self, provider: str, reason: str) -> None:
        retries = self._retries.get((provider, reason))
        if retries is None:
            retries = self._retries[(provider, reason)] = self.retries.labels(provider, reason)
        retries.inc()

    def on_circuit_state(self, provider: str, state: CircuitState) -> None:
        self._children(provider).circuit.set(int(state))

    def on_batch_size(self, provider: str, size: int) -> None:
        self._children(provider).batch_size.set(size)

    def forget(self, provider: str) -> None:
        """Drop a removed provider's gauges (its circuit and AIMD size would say it is still
        there); counters and histograms keep its history, as Prometheus expects of them. A
        provider added again under the name reports afresh."""
        if self._per_provider.pop(provider, None) is not None:  # bound: both gauges exist
            self.circuit.remove(provider)
            self.batch_size.remove(provider)


class _ProviderChildren:
    __slots__ = ("batch_size", "circuit", "duration", "inputs", "inputs_per_call")

    def __init__(self, m: ProviderMetrics, provider: str) -> None:
        self.duration = m.duration.labels(provider)
        self.inputs_per_call = m.inputs_per_call.labels(provider)
        self.inputs = m.inputs.labels(provider)
        self.circuit = m.circuit.labels(provider)
        self.batch_size = m.batch_size.labels(provider)
