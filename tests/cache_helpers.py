"""Fake-backed embedding models with an embedding cache, for the cache and dedupe tests."""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from embedplex.backends.fake import FakeBackend
from embedplex.backends.model_files import load_spec
from embedplex.backends.tokenizer import TextTokenizer
from embedplex.cache import EmbeddingCache
from embedplex.config import Settings
from embedplex.core.types import EmbedRequest
from embedplex.models.embedding import LocalEmbeddingModel
from embedplex.models.options import LocalModelOptions


def cached_model(
    model_dir: Path,
    backend: FakeBackend,
    cache: EmbeddingCache,
    *,
    name: str | None = None,
    **overrides: object,
) -> LocalEmbeddingModel:
    settings = Settings(model_id=str(model_dir), **overrides)  # type: ignore[arg-type]
    spec = load_spec(str(model_dir), model_dir)
    tokenizer = TextTokenizer.from_dir(
        model_dir, max_length=spec.max_input_length, vocab_size=spec.vocab_size
    )
    options = LocalModelOptions.from_settings(settings, spec, run_tokens=backend.run_tokens)
    if name is not None:
        options = dataclasses.replace(options, name=name)
    return LocalEmbeddingModel(spec, tokenizer, backend, options, cache=cache)


@asynccontextmanager
async def started(model: LocalEmbeddingModel) -> AsyncIterator[LocalEmbeddingModel]:
    await model.start()
    try:
        yield model
    finally:
        await model.close()


def req(*inputs: str, **fields: object) -> EmbedRequest:
    return EmbedRequest(inputs=list(inputs), **fields)  # type: ignore[arg-type]
