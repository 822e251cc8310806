"""Metrics of models served as Ray Serve replicas (``models/ray.py`` reports here).

Replica states come from ``serve.status()``, polled by the gateway every few seconds, never per
request; requests per replica are counted from the replica id each answer carries, and a replica's
series is dropped once it is gone. Inputs and tokens are counted in the model's own
``embedplex_inputs_total`` and ``embedplex_tokens_total`` (``model_metrics.py``), as a local
model's are.
"""

from __future__ import annotations

import contextlib

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

    def forget_replicas(self, model: str, replicas: set[str]) -> None:
        """Replicas gone for good (each restart is a new id): their series are dropped, not
        kept forever."""
        for replica in replicas:
            with contextlib.suppress(KeyError):  # never answered
                self.replica_requests.remove(model, replica)

    def on_retry(self, model: str) -> None:
        self.retries.labels(model).inc()
