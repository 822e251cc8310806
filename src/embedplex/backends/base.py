"""The narrow protocol every local inference engine implements, and the batch it takes."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from embedplex.backends.model_files import ModelKind
from embedplex.backends.pooling import Floats, Ints
from embedplex.backends.tokenizer import Encoded
from embedplex.core.errors import BackendError


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


class Backend(Protocol):
    """A loaded model on one engine: token batches in, one row of numbers per input out.

    The narrow surface every engine implements (TEI's ``Backend`` trait): what it holds
    (``kind``: an embedding model or a cross-encoder), its limits, ``health``, ``close``, and one
    call per kind of model. ``embed`` and ``score`` run in a worker thread, one batch at a time,
    and run the whole batch they are handed: batches are sized before they get here, by the
    model's one cost model (``batching.cost.TokenBudget``). The call a model was not built for
    raises ``BackendError`` (see ``require_kind``).

    ``run_tokens``: the most padded tokens one forward pass should take (None: any batch runs
    whole as efficiently); the model's batch budget is cut to it when the model is built.
    """

    name: str
    device: str
    dtype: str
    dim: int
    kind: ModelKind
    run_tokens: int | None

    def embed(self, batch: TokenBatch) -> Floats:
        """Un-normalized pooled vectors, (batch, dim) float32 (embedding models)."""
        ...

    def embed_all(self, batch: TokenBatch) -> list[Floats]:
        """Per-token hidden states, unpooled: one (tokens, dim) float32 array per row, padding
        dropped (embedding models; TEI ``/embed_all``)."""
        ...

    def score(self, batch: TokenBatch) -> Floats:
        """One raw relevance logit per (query, text) pair, float32 (cross-encoders)."""
        ...

    def health(self) -> None:
        """Raise if the engine can no longer serve (``FatalBackendError``)."""
        ...

    def close(self) -> None: ...


def require_kind(backend: str, holds: ModelKind, wanted: ModelKind) -> None:
    """Refuse a call the loaded model was not built for (a wiring error, never a client's).

    A cross-encoder's graph has no pooled output and an embedding model has no relevance head:
    running the wrong call would return numbers, just meaningless ones.
    """
    if holds is not wanted:
        model = "an embedding model" if holds is ModelKind.EMBEDDING else "a cross-encoder"
        call = "embed" if wanted is ModelKind.EMBEDDING else "score pairs"
        raise BackendError(f"the {backend} backend holds {model}: it cannot {call}")
