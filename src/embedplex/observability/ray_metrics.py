"""Metrics of models served as Ray Serve replicas (``models/ray.py`` reports here).

Replica states come from ``serve.status()``, polled by the gateway every few seconds, never per
request; requests per replica are counted from the replica id each answer carries.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge


class RayMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.replicas = Gauge(
            "embedplex_ray_replicas",
            "Ray Serve replicas of a model, by state (RUNNING, STARTING, ...).",
            ["model", "state"],
            registry=registry,
        )
        self.replica_requests = Counter(
            "embedplex_ray_replica_requests",
            "Requests a Ray Serve replica answered.",
            ["model", "replica"],
            registry=registry,
        )
        self.retries = Counter(
            "embedplex_ray_retries",
            "Requests retried once because their replica died or was unreachable.",
            ["model"],
            registry=registry,
        )
        self._states: dict[str, set[str]] = {}

    def on_replicas(self, model: str, states: dict[str, int]) -> None:
        """The polled states; a state that has gone reads 0 rather than its last count."""
        for state in self._states.get(model, set()) - states.keys():
            self.replicas.labels(model, state).set(0)
        for state, count in states.items():
            self.replicas.labels(model, state).set(count)
        self._states[model] = self._states.get(model, set()) | states.keys()

    def on_answer(self, model: str, replica: str) -> None:
        self.replica_requests.labels(model, replica).inc()

    def on_retry(self, model: str) -> None:
        self.retries.labels(model).inc()
