"""PyTorch backend (transformers): CPU or CUDA, float16/bfloat16 on GPU."""

from __future__ import annotations

import inspect
import logging
import threading
import weakref
from contextlib import nullcontext
from typing import Any

import numpy as np

from embedplex.backends.base import TokenBatch, require_kind
from embedplex.backends.model_files import (
    ModelKind,
    ModelSpec,
    Pooling,
    load_transformers_model,
)
from embedplex.backends.passes import PassGate
from embedplex.backends.pooling import Floats
from embedplex.backends.warmup import check_output, warmup_batch
from embedplex.core.errors import BackendError, FatalBackendError

logger = logging.getLogger(__name__)

_DTYPES = {"float32": "float32", "float16": "float16", "bfloat16": "bfloat16"}


class TorchBackend:
    name = "torch"
    run_tokens: int | None = None  # no pass limit: the batch budget is the setting

    def __init__(
        self,
        model: Any,
        *,
        pooling: Pooling,
        dtype: str,
        device: str,
        dim: int,
        kind: ModelKind = ModelKind.EMBEDDING,
        gate: PassGate | None = None,
        threads: int = 1,
    ) -> None:
        self._model = model
        self._gate = gate  # the process's core gate (models/layout.py); CPU only
        self._threads = threads
        self.pooling = pooling
        self.dtype = dtype
        self.device = device
        self.dim = dim
        self.kind = kind
        # signature() follows decorators' __wrapped__, so wrapped forwards are read right.
        self._uses_types = "token_type_ids" in inspect.signature(model.forward).parameters

    @classmethod
    def load(
        cls,
        spec: ModelSpec,
        *,
        dtype: str,
        device: str,
        threads: int | None = None,
        gate: PassGate | None = None,
    ) -> TorchBackend:
        try:
            import torch
            import transformers  # noqa: F401  (only to say what is missing)
        except ImportError as exc:
            raise FatalBackendError("the torch backend needs embedplex[torch] installed") from exc
        if dtype not in _DTYPES:
            raise FatalBackendError("the torch backend serves float32, float16 or bfloat16")
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        if device == "cuda" and not torch.cuda.is_available():
            raise FatalBackendError("--device cuda asked for, but torch sees no CUDA device")
        if device == "cpu" and dtype == "float16":
            raise FatalBackendError("float16 on CPU is not supported; use float32 or bfloat16")
        # One CPU load at a time: two (lazy models load in threads) would both pass the check.
        with _cpu_loads if device == "cpu" else nullcontext():
            if device == "cpu" and threads:
                _claim_threads(spec.model_id, threads)
                torch.set_num_threads(threads)
            model = load_transformers_model(
                spec.path, spec.kind, spec.model_type, getattr(torch, _DTYPES[dtype])
            )
            model.eval().to(device)
            backend = cls(
                model,
                pooling=spec.pooling,
                dtype=dtype,
                device=device,
                dim=spec.hidden_size,
                kind=spec.kind,
                gate=gate if device == "cpu" else None,
                threads=threads or torch.get_num_threads(),
            )
            backend._warm_up(spec)
            if device == "cpu":
                _on_cpu.add(backend)
        return backend

    def _warm_up(self, spec: ModelSpec) -> None:
        """One tiny pass: an output narrower or wider than the config's hidden size fails the
        start, not every request."""
        import torch

        with torch.inference_mode():
            output, _ = self._forward(warmup_batch(spec))
        out = output.logits if self.kind is ModelKind.RERANKER else output.last_hidden_state
        check_output("torch", spec, tuple(out.shape))

    def _forward(self, batch: TokenBatch) -> Any:
        import torch

        ids = torch.from_numpy(batch.input_ids).to(self.device)
        mask = torch.from_numpy(batch.attention_mask).to(self.device)
        kwargs = {"input_ids": ids, "attention_mask": mask}
        if self._uses_types:
            kwargs["token_type_ids"] = torch.from_numpy(batch.token_type_ids).to(self.device)
        gate = self._gate.forward(self._threads) if self._gate is not None else nullcontext()
        try:
            with gate:
                return self._model(**kwargs), mask
        except torch.cuda.OutOfMemoryError as exc:
            raise BackendError("CUDA out of memory; lower --max-batch-tokens") from exc

    def score(self, batch: TokenBatch) -> Floats:
        """Raw relevance logits of a cross-encoder, one per (query, text) pair."""
        require_kind(self.name, self.kind, ModelKind.RERANKER)
        import torch

        with torch.inference_mode():
            output, _ = self._forward(batch)
            out: Floats = output.logits[:, 0].float().cpu().numpy().astype(np.float32, copy=False)
            return out

    def embed(self, batch: TokenBatch) -> Floats:
        require_kind(self.name, self.kind, ModelKind.EMBEDDING)
        import torch

        with torch.inference_mode():
            output, mask = self._forward(batch)
            hidden = output.last_hidden_state
            if self.pooling is Pooling.CLS:
                pooled = hidden[:, 0]
            elif self.pooling is Pooling.LAST_TOKEN:
                last = mask.sum(dim=1) - 1
                pooled = hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
            else:
                m = mask.unsqueeze(-1).to(hidden.dtype)
                pooled = (hidden * m).sum(dim=1) / m.sum(dim=1).clamp(min=1e-9)
            out: Floats = pooled.float().cpu().numpy().astype(np.float32, copy=False)
            return out

    def embed_all(self, batch: TokenBatch) -> list[Floats]:
        """Per-token hidden states, unpooled (TEI ``/embed_all``): one (tokens, dim) array per
        row, padding dropped."""
        require_kind(self.name, self.kind, ModelKind.EMBEDDING)
        import torch

        with torch.inference_mode():
            output, _ = self._forward(batch)
            hidden = output.last_hidden_state.float().cpu().numpy()
        lengths = batch.attention_mask.sum(axis=1).tolist()
        return [
            np.ascontiguousarray(hidden[i, :n], dtype=np.float32) for i, n in enumerate(lengths)
        ]

    def health(self) -> None:
        if self._model is None:
            raise FatalBackendError("the torch model is closed")

    def close(self) -> None:
        self._model = None
        _on_cpu.discard(self)


# The torch models on the CPU in this process: torch's intra-op thread count is one setting for
# the whole process, so they must all ask for the same (``_claim_threads``).
_on_cpu: weakref.WeakSet[TorchBackend] = weakref.WeakSet()
_cpu_loads = threading.Lock()


def _claim_threads(model_id: str, threads: int) -> None:
    """Refuse a thread count other than the one the process's open torch CPU models run on:
    ``torch.set_num_threads`` would change theirs too, and the core gate would count their
    passes at the threads they asked for, not the ones they get."""
    others = {b._threads for b in list(_on_cpu)} - {threads}
    if others:
        raise FatalBackendError(
            f"{model_id}: torch runs every CPU model of a process on one intra-op thread count, "
            f"and another torch model here runs on {min(others)} threads per pass, not "
            f"{threads}: give the torch models on the CPU the same inference_streams, or set "
            "inference_threads"
        )
