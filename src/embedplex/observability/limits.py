"""Metrics of per-key rate limits: refusals by key and reason, and where limits are counted.

``key_id`` labels are server-issued key ids (bounded by the number of keys), never secrets.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge

BACKENDS = ("redis", "local")


class RateLimitMetrics:
    """The ``LimitObserver`` (``embedplex.limits``) that the app's limiter reports to."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.refused = Counter(
            "embedplex_rate_limited",
            "Requests refused with 429 by a key's limits, by reason (rpm, tpm, concurrency).",
            ["key_id", "reason"],
            registry=registry,
        )
        self.backend = Gauge(
            "embedplex_rate_limit_backend",
            "1 for where per-key limits are counted now: redis (shared) or local (this process).",
            ["backend"],
            registry=registry,
        )
        self.fallbacks = Counter(
            "embedplex_rate_limit_fallbacks",
            "Times Redis was lost and limits fell back to this process.",
            registry=registry,
        )
        self._was_redis = False

    def on_refused(self, key_id: str, reason: str) -> None:
        self.refused.labels(key_id, reason).inc()

    def on_backend(self, backend: str) -> None:
        for name in BACKENDS:
            self.backend.labels(name).set(1.0 if name == backend else 0.0)
        if backend == "local" and self._was_redis:
            self.fallbacks.inc()
        self._was_redis = backend == "redis"
