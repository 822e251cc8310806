"""Loading a configured local model: its files read (``read_model``), its engine loaded
(``load_backend``), and the model class its files call for built (``load_local_model``).
All of it blocks (the hub, the ONNX export): call it from a thread."""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

from embedplex.backends.base import Backend
from embedplex.backends.model_files import (
    ModelKind,
    ModelSpec,
    Pooling,
    load_spec,
    resolve_model_dir,
    tokenizer_for,
)
from embedplex.backends.onnx_cache import default_cache_dir
from embedplex.backends.passes import PassGate
from embedplex.batching import BatchObserver
from embedplex.cache import EmbeddingCache
from embedplex.config import Settings
from embedplex.core.errors import FatalBackendError
from embedplex.models.config import KINDS, ModelConfig
from embedplex.models.embedding import LocalEmbeddingModel
from embedplex.models.layout import inference_layout
from embedplex.models.local import LocalModel
from embedplex.models.options import LocalModelOptions, resolved
from embedplex.models.rerank import LocalRerankModel

logger = logging.getLogger(__name__)


def load_backend(
    settings: Settings,
    spec: ModelSpec,
    model: ModelConfig | None = None,
    *,
    gate: PassGate | None = None,
) -> Backend:
    """The configured engine; it embeds or scores according to ``spec.kind``.

    ``model``: the resolved table (default: the flat settings' model); ``gate``: the process's
    core gate, shared by every local model (``models/layout.py``).
    """
    m = model or settings.flat_model()
    layout = inference_layout(settings, model=m)
    threads = layout.threads
    if m.backend == "torch":
        from embedplex.backends.pytorch import TorchBackend

        return TorchBackend.load(
            spec, dtype=resolved(m.dtype), device=resolved(m.device), threads=threads, gate=gate
        )
    from embedplex.backends.onnx import OnnxBackend

    return OnnxBackend.load(
        spec,
        dtype=resolved(m.dtype),
        device=resolved(m.device),
        cache_dir=settings.cache_dir or default_cache_dir(),
        threads=threads,
        solo_threads=layout.solo_threads,
        int8_min_cosine=resolved(m.int8_min_cosine),
        gate=gate,
    )


def read_model(settings: Settings, m: ModelConfig) -> ModelSpec:
    """What a configured model's files say, with its table's overrides (blocking I/O: the
    hub)."""
    path, sha = resolve_model_dir(
        m.model_id,
        revision=m.revision,
        old_cache_dir=settings.cache_dir,
        hub_timeout_s=settings.hub_timeout_s,
    )
    spec = load_spec(
        m.model_id,
        path,
        revision=m.revision,
        sha=sha,
        pooling=Pooling(m.pooling) if m.pooling else None,
        max_input_length=m.max_input_length,
    )
    return _within_batch(spec, m)


def _within_batch(spec: ModelSpec, m: ModelConfig) -> ModelSpec:
    """The spec with its longest input no longer than ``max_batch_tokens``, as TEI decides it:
    with auto_truncate the length is cut to the budget (inputs are truncated there), with a
    warning; without, the start fails. A longer input would otherwise run as a batch of its
    own, over the budget that was set. (An explicit max_input_length over the budget is refused
    with the settings.)"""
    budget = m.max_batch_tokens
    if budget is None or spec.max_input_length <= budget:
        return spec
    if not m.auto_truncate:
        raise FatalBackendError(
            f"model {m.name!r}: max_batch_tokens ({budget}) is below the model's max input "
            f"length ({spec.max_input_length}): raise max_batch_tokens to at least "
            f"{spec.max_input_length}, or set auto_truncate to cut inputs at {budget} tokens"
        )
    logger.warning(
        "%s: the model's max input length %d exceeds max_batch_tokens (%d): inputs are "
        "truncated to %d tokens, as auto_truncate is on; raise max_batch_tokens to at least "
        "%d to serve them whole",
        m.name,
        spec.max_input_length,
        budget,
        budget,
        spec.max_input_length,
    )
    return dataclasses.replace(spec, max_input_length=budget)


def load_local_model(
    settings: Settings,
    model: ModelConfig | None = None,
    *,
    observers: list[BatchObserver] | None = None,
    gate: PassGate | None = None,
    cache: EmbeddingCache | None = None,
) -> LocalModel[Any]:
    """Resolve, read and load a configured model (blocking I/O; call from a thread).

    ``model``: a resolved table of ``Settings.local_models()`` (default: the flat settings'
    one model); ``gate``: the process's core gate (``models/layout.py``); ``cache``: the
    process's embedding cache (default: none, in-flight dedupe only).
    """
    m = model or settings.flat_model()
    spec = read_model(settings, m)
    expected = m.model_kind
    if expected is not None and spec.kind is not expected:
        found = next(k for k, v in KINDS.items() if v is spec.kind)
        raise FatalBackendError(
            f"model {m.name!r} is configured as kind = {m.kind!r}, but {m.model_id} is a "
            f"{found} model"
        )
    tokenizer = tokenizer_for(spec)
    backend = load_backend(settings, spec, m, gate=gate)
    logger.info(
        "%s: inference layout %s (batches at once x intra-op threads)",
        m.name,
        inference_layout(settings, model=m),
    )
    options = LocalModelOptions.from_settings(
        settings, spec, run_tokens=backend.run_tokens, model=m
    )
    if spec.kind is ModelKind.RERANKER:
        return LocalRerankModel(spec, tokenizer, backend, options, observers=observers)
    return LocalEmbeddingModel(spec, tokenizer, backend, options, observers=observers, cache=cache)
