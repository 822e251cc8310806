"""Per-model batch metrics: a ``BatchObserver`` that records each batch once, when it is done.

Observing per batch (not per input) keeps the hot path cheap; label children are bound once per
model. A short window of recent batches feeds ``/api/v1/status`` (recent throughput), which a
Prometheus counter cannot answer without a query engine.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram

from embedplex.batching import BatchStats, Item

SIZE_BUCKETS = tuple(float(2**k) for k in range(13))  # 1 .. 4096 inputs
TOKEN_BUCKETS = tuple(float(2**k) for k in range(4, 21))  # 16 .. 1M padded tokens
RATIO_BUCKETS = (0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)
BATCH_DURATION_BUCKETS = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
)  # fmt: skip


@dataclass(frozen=True, slots=True)
class ModelMetricFamilies:
    """The metric objects shared by every model's observer (labelled by model)."""

    batch_size: Histogram
    batch_tokens: Histogram
    padding_ratio: Histogram
    batch_duration: Histogram
    inputs: Counter
    tokens: Counter
    batch_failures: Counter
    dropped: Counter
    expired: Counter
    refused: Counter


class RecentBatches:
    """The last few minutes of batches, for recent throughput and batch size."""

    def __init__(self, maxlen: int = 4096) -> None:
        self._batches: deque[tuple[float, int, int, bool]] = deque(maxlen=maxlen)

    def add(self, size: int, tokens: int, failed: bool) -> None:
        self._batches.append((time.monotonic(), size, tokens, failed))

    def summary(self, window: float = 60.0) -> dict[str, float | int]:
        """Throughput and batch shape over the last ``window`` seconds."""
        return self.combined([self], window)

    @staticmethod
    def combined(sources: Sequence[RecentBatches], window: float = 60.0) -> dict[str, float | int]:
        """``summary`` over the batches of several sources (a route's providers)."""
        since = time.monotonic() - window
        sizes: list[int] = []
        tokens = failed = 0
        for source in sources:
            for at, size, toks, bad in reversed(source._batches):
                if at < since:
                    break
                if bad:
                    failed += 1
                else:
                    sizes.append(size)
                    tokens += toks
        done = sum(sizes)
        return {
            "window_s": window,
            "batches": len(sizes) + failed,
            "failed_batches": failed,
            "inputs_per_s": round(done / window, 3),
            "tokens_per_s": round(tokens / window, 3),
            "mean_batch_size": round(done / len(sizes), 2) if sizes else 0.0,
            "max_batch_size": max(sizes, default=0),
        }


class ModelMetrics:
    """Records one model's (or provider's) batches; plug into ``Batcher(observers=[...])``.

    For remote providers an item's cost is 1, so "tokens" count inputs there.
    """

    def __init__(self, families: ModelMetricFamilies, model: str) -> None:
        f = families
        self.model = model
        self.recent = RecentBatches()
        self._size = f.batch_size.labels(model)
        self._tokens_hist = f.batch_tokens.labels(model)
        self._padding = f.padding_ratio.labels(model)
        self._duration = f.batch_duration.labels(model)
        self._inputs = f.inputs.labels(model)
        self._tokens = f.tokens.labels(model)
        self._dropped = f.dropped.labels(model)
        self._expired = f.expired.labels(model)
        self._refused = f.refused.labels(model)
        self._failures = f.batch_failures

    @staticmethod
    def define(registry: CollectorRegistry) -> ModelMetricFamilies:
        def hist(name: str, doc: str, buckets: Sequence[float]) -> Histogram:
            return Histogram(name, doc, ["model"], buckets=buckets, registry=registry)

        def count(name: str, doc: str, labels: Sequence[str] = ("model",)) -> Counter:
            return Counter(name, doc, labels, registry=registry)

        return ModelMetricFamilies(
            batch_size=hist("embedplex_batch_size", "Inputs per batch.", SIZE_BUCKETS),
            batch_tokens=hist(
                "embedplex_batch_tokens", "Padded tokens per batch (what runs).", TOKEN_BUCKETS
            ),
            padding_ratio=hist(
                "embedplex_batch_padding_ratio",
                "Share of a batch's padded tokens that are padding.",
                RATIO_BUCKETS,
            ),
            batch_duration=hist(
                "embedplex_batch_duration_seconds",
                "Time one batch spent in the backend (or upstream).",
                BATCH_DURATION_BUCKETS,
            ),
            inputs=count("embedplex_inputs", "Inputs embedded (successful batches)."),
            tokens=count("embedplex_tokens", "Tokens embedded, without padding."),
            batch_failures=count(
                "embedplex_batch_failures", "Batches that failed.", ("model", "error_type")
            ),
            dropped=count("embedplex_dropped_inputs", "Queued inputs whose caller had gone."),
            expired=count("embedplex_expired_inputs", "Inputs that outwaited the queue timeout."),
            refused=count("embedplex_refused_inputs", "Inputs refused because the queue was full."),
        )

    def on_served(self, inputs: int, tokens: int) -> None:
        """A request another process batched (a Ray replica) answered: its inputs and tokens."""
        self._inputs.inc(inputs)
        self._tokens.inc(tokens)

    # -- BatchObserver ---------------------------------------------------------------------

    def on_admitted(self, n: int) -> None:
        pass  # the queue size gauge is read from the batcher at scrape time

    def on_refused(self, n: int) -> None:
        self._refused.inc(n)

    def on_expired(self, n: int) -> None:
        if n:
            self._expired.inc(n)

    def on_dropped(self, n: int) -> None:
        self._dropped.inc(n)

    def on_batch_started(self, items: Sequence[Item[Any, Any]]) -> None:
        pass

    def on_batch_done(self, stats: BatchStats) -> None:
        padded = stats.padded_tokens
        self._size.observe(stats.size)
        self._tokens_hist.observe(padded)
        if padded:
            self._padding.observe(1.0 - stats.tokens / padded)
        self._duration.observe(stats.duration)
        failed = stats.error is not None
        if failed:
            kind = getattr(stats.error, "kind", type(stats.error).__name__)
            self._failures.labels(self.model, kind).inc()
        else:
            self._inputs.inc(stats.size)
            self._tokens.inc(stats.tokens)
        self.recent.add(stats.size, stats.tokens, failed)
