"""The narrow protocol every local inference engine implements."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from embedplex.backends.pooling import Floats, Ints
from embedplex.backends.tokenizer import Encoded


@dataclass(frozen=True, slots=True)
class TokenBatch:
    """Right-padded token arrays for one forward pass."""

    input_ids: Ints
    attention_mask: Ints
    token_type_ids: Ints

    @classmethod
    def collate(cls, encoded: Sequence[Encoded], pad_id: int = 0) -> TokenBatch:
        n = len(encoded)
        width = max(len(e) for e in encoded)
        ids = np.full((n, width), pad_id, dtype=np.int64)
        mask = np.zeros((n, width), dtype=np.int64)
        types = np.zeros((n, width), dtype=np.int64)
        for row, enc in enumerate(encoded):
            length = len(enc)
            ids[row, :length] = enc.ids
            mask[row, :length] = 1
            if enc.type_ids is not None:
                types[row, :length] = enc.type_ids
        return cls(ids, mask, types)

    @property
    def size(self) -> int:
        return int(self.input_ids.shape[0])


class EmbeddingBackend(Protocol):
    """A loaded model that turns token batches into pooled vectors.

    ``embed`` runs in a worker thread, one batch at a time; it returns un-normalized pooled
    vectors of shape (batch, dim) as float32. ``health`` raises if the engine can no longer serve.
    ``run_tokens``: the most padded tokens one forward pass takes, when the engine runs bigger
    batches in pieces (None: it runs any batch whole).
    """

    name: str
    device: str
    dtype: str
    dim: int
    run_tokens: int | None

    def embed(self, batch: TokenBatch) -> Floats: ...

    def health(self) -> None: ...

    def close(self) -> None: ...


class ScoringBackend(Protocol):
    """A loaded cross-encoder: token batches of (query, text) pairs -> one raw logit each."""

    name: str
    device: str
    dtype: str
    dim: int
    run_tokens: int | None

    def score(self, batch: TokenBatch) -> Floats: ...

    def health(self) -> None: ...

    def close(self) -> None: ...
