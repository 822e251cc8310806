"""Pooling token embeddings into one vector per input (numpy, shared by the CPU backends)."""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from embedplex.backends.model_files import Pooling

Floats = npt.NDArray[np.float32]
Ints = npt.NDArray[np.int64]


def pool(hidden: Floats, attention_mask: Ints, method: Pooling) -> Floats:
    """hidden: (batch, seq, dim); attention_mask: (batch, seq) of 0/1. Returns (batch, dim)."""
    if method is Pooling.CLS:
        cls_vectors: Floats = np.ascontiguousarray(hidden[:, 0, :], dtype=np.float32)
        return cls_vectors
    if method is Pooling.LAST_TOKEN:
        # Right padding: the last real token sits at length - 1.
        last = attention_mask.sum(axis=1).astype(np.int64) - 1
        rows = np.arange(hidden.shape[0])
        last_vectors: Floats = np.ascontiguousarray(hidden[rows, last, :], dtype=np.float32)
        return last_vectors
    mask = attention_mask[:, :, None].astype(np.float32)
    summed = np.einsum("bsd,bs->bd", hidden.astype(np.float32, copy=False), mask[:, :, 0])
    counts = np.clip(mask.sum(axis=1), 1e-9, None)
    mean: Floats = (summed / counts).astype(np.float32, copy=False)
    return mean


def normalize_rows(vectors: Floats) -> Floats:
    norms = np.linalg.norm(vectors, axis=-1, keepdims=True)
    out: Floats = (vectors / np.clip(norms, 1e-12, None)).astype(np.float32, copy=False)
    return out
