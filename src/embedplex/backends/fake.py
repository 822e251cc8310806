"""A deterministic backend for tests and demos: no model, real shapes, injectable faults."""

from __future__ import annotations

import threading
import time
from contextlib import nullcontext

import numpy as np

from embedplex.backends.base import TokenBatch, require_kind
from embedplex.backends.model_files import ModelKind
from embedplex.backends.passes import PassGate
from embedplex.backends.pooling import Floats
from embedplex.core.errors import FatalBackendError


class FakeBackend:
    """Each token id maps to a fixed random vector; an input's vector is their masked mean.

    ``delay`` sleeps per batch (seconds); ``fail_next`` makes the next n batches raise;
    ``die()`` makes every later batch and health check fail fatally. ``batches`` records the
    sizes seen, so tests can check how the batcher cut them. ``kind`` says which call it
    answers (``embed``, or ``score`` for a fake cross-encoder); ``run_tokens`` may be set to
    play a backend with a pass limit. ``gate``: held around each pass (and its delay) as a
    CPU engine holds the process's core gate.
    """

    name = "fake"
    device = "cpu"
    dtype = "float32"
    run_tokens: int | None = None

    def __init__(
        self,
        dim: int = 16,
        *,
        delay: float = 0.0,
        vocab_size: int = 30522,
        kind: ModelKind = ModelKind.EMBEDDING,
        gate: PassGate | None = None,
    ) -> None:
        self.dim = dim
        self.kind = kind
        self.delay = delay
        self.gate = gate
        self.fail_next = 0
        self.batches: list[tuple[int, int]] = []
        self._dead = False
        self._lock = threading.Lock()
        rng = np.random.default_rng(0)
        self._table = rng.standard_normal((vocab_size, dim)).astype(np.float32)

    def embed(self, batch: TokenBatch) -> Floats:
        require_kind(self.name, self.kind, ModelKind.EMBEDDING)
        return self._pooled(batch)

    def _run(self, batch: TokenBatch) -> Floats:
        """Record the batch, apply injected faults and delay; the per-token vectors."""
        with self.gate.forward(1) if self.gate is not None else nullcontext():
            return self._pass(batch)

    def _pass(self, batch: TokenBatch) -> Floats:
        with self._lock:
            self.batches.append((batch.size, int(batch.input_ids.shape[1])))
            if self._dead:
                raise FatalBackendError("fake backend is dead")
            if self.fail_next:
                self.fail_next -= 1
                raise RuntimeError("injected failure")
        if self.delay:
            time.sleep(self.delay)
        vectors: Floats = self._table[batch.input_ids % self._table.shape[0]]
        return vectors

    def _pooled(self, batch: TokenBatch) -> Floats:
        vectors = self._run(batch)
        mask = batch.attention_mask[:, :, None].astype(np.float32)
        out: Floats = ((vectors * mask).sum(axis=1) / mask.sum(axis=1)).astype(np.float32)
        return out

    def embed_all(self, batch: TokenBatch) -> list[Floats]:
        """Each row's per-token vectors, padding dropped (their mean is ``embed``'s vector)."""
        require_kind(self.name, self.kind, ModelKind.EMBEDDING)
        vectors = self._run(batch)
        lengths = batch.attention_mask.sum(axis=1).tolist()
        return [np.ascontiguousarray(vectors[i, :n]) for i, n in enumerate(lengths)]

    def score(self, batch: TokenBatch) -> Floats:
        """A fake relevance logit: the first component of the pooled vector, times ten."""
        require_kind(self.name, self.kind, ModelKind.RERANKER)
        scores: Floats = (self._pooled(batch)[:, 0] * 10).astype(np.float32)
        return scores

    def die(self) -> None:
        self._dead = True

    def health(self) -> None:
        if self._dead:
            raise FatalBackendError("fake backend is dead")

    def close(self) -> None:
        pass
