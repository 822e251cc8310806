"""One backend protocol for embedders and scorers: each engine refuses the call it is not for."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from embedplex.backends.base import Backend, TokenBatch
from embedplex.backends.fake import FakeBackend
from embedplex.backends.model_files import ModelKind, load_spec
from embedplex.backends.tokenizer import TextTokenizer
from embedplex.config import Settings
from embedplex.core.errors import BackendError
from embedplex.models.loading import load_backend
from tiny_models import make_tiny_reranker


def _batch(rows: list[list[int]]) -> TokenBatch:
    width = max(len(r) for r in rows)
    ids = np.zeros((len(rows), width), dtype=np.int64)
    mask = np.zeros_like(ids)
    for k, row in enumerate(rows):
        ids[k, : len(row)] = row
        mask[k, : len(row)] = 1
    return TokenBatch(ids, mask, np.zeros_like(ids))


def test_the_fake_embeds_or_scores_as_it_is_told() -> None:
    batch = _batch([[2, 18, 19, 3], [2, 20, 3]])
    embedder: Backend = FakeBackend(dim=8)
    scorer: Backend = FakeBackend(dim=8, kind=ModelKind.RERANKER)
    assert embedder.embed(batch).shape == (2, 8)
    assert scorer.score(batch).shape == (2,)
    with pytest.raises(BackendError, match="holds an embedding model: it cannot score pairs"):
        embedder.score(batch)
    with pytest.raises(BackendError, match="holds a cross-encoder: it cannot embed"):
        scorer.embed(batch)


@pytest.mark.slow
@pytest.mark.parametrize("engine", ["onnx", "torch"])
def test_a_cross_encoder_scores_and_refuses_to_embed(tmp_path: Path, engine: str) -> None:
    model_dir = make_tiny_reranker(tmp_path / "tiny-ce", seed=3)
    settings = Settings(model_id=str(model_dir), backend=engine, cache_dir=tmp_path / "c")
    spec = load_spec(str(model_dir), model_dir)
    tokenizer = TextTokenizer.from_dir(
        model_dir, max_length=spec.max_input_length, vocab_size=spec.vocab_size
    )
    batch = TokenBatch.collate(tokenizer.encode_pairs("fox", ["a fox", "a dog"], truncate=True))
    backend = load_backend(settings, spec)
    try:
        assert backend.kind is ModelKind.RERANKER
        assert backend.score(batch).shape == (2,)
        with pytest.raises(BackendError, match="holds a cross-encoder: it cannot embed"):
            backend.embed(batch)
    finally:
        backend.close()
