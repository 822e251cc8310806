"""One tiny forward pass at load: a model whose graph cannot serve fails its start, not every
request after a start that reported ready."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from embedplex.backends.base import TokenBatch
from embedplex.backends.model_files import ModelKind, ModelSpec
from embedplex.core.errors import FatalBackendError

_TOKENS = 3  # a few tokens: the pass costs next to nothing, whatever the model


def warmup_batch(spec: ModelSpec) -> TokenBatch:
    """One input of a few token ids, all inside the model's vocabulary."""
    vocab = max(spec.vocab_size, _TOKENS + 1)
    ids = np.arange(1, _TOKENS + 1, dtype=np.int64).reshape(1, _TOKENS) % vocab
    return TokenBatch(ids, np.ones_like(ids), np.zeros_like(ids))


def check_output(engine: str, spec: ModelSpec, shape: Sequence[int]) -> None:
    """Refuse a warm-up output that is not what serving reads: (1, tokens, hidden size) for an
    embedding model (whose width ``load_spec`` made sure of), (1, labels) for a cross-encoder."""
    shape = tuple(int(n) for n in shape)
    if spec.kind is ModelKind.RERANKER:
        fits = len(shape) == 2 and shape[0] == 1 and shape[1] >= 1
        wanted = "(1, labels)"
    else:
        fits = shape == (1, _TOKENS, spec.hidden_size)
        wanted = f"(1, {_TOKENS}, {spec.hidden_size})"
    if not fits:
        raise FatalBackendError(
            f"{spec.model_id} on {engine}: a {_TOKENS}-token warm-up pass gave an output of shape "
            f"{shape}, not {wanted} (hidden_size {spec.hidden_size} in its config)"
        )
