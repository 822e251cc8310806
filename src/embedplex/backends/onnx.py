"""ONNX Runtime backend: CPU by default; CUDA when asked (``--device cuda``: on the GPU or not
at all) or with ``auto`` where its provider loads."""

from __future__ import annotations

import logging
import threading
from functools import partial
from pathlib import Path

import numpy as np
import numpy.typing as npt

from embedplex.backends.base import TokenBatch, require_kind
from embedplex.backends.model_files import ModelKind, ModelSpec, Pooling
from embedplex.backends.onnx_cache import ensure_onnx
from embedplex.backends.onnx_providers import require_device, session_options, session_providers
from embedplex.backends.passes import CoreGate, PassGate
from embedplex.backends.pooling import Floats, pool
from embedplex.backends.warmup import check_output, warmup_batch
from embedplex.core.cores import process_cores
from embedplex.core.errors import FatalBackendError

logger = logging.getLogger(__name__)

# The pass limit this backend declares (``run_tokens``): the model's batch budget is cut to it,
# so one batch is one session run. Small runs keep each layer's activations in the core's cache;
# 512 was measured the fastest (docs/architecture.md, "Why 512").
RUN_TOKENS = 512


def make_session(
    path: Path, device: str, threads: int | None, *, shared_arena: bool = False
) -> object:
    """A session on ``path``; with ``shared_arena``, its activations come from one arena that
    every such session in the process shares (else each has its own)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    if shared_arena:
        _register_shared_arena()
        options.add_session_config_entry("session.use_env_allocators", "1")
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = threads or process_cores()
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    # The event loop and the tokenizer share these cores: spinning workers would take CPU from
    # them between batches (measured: ~1.5x served throughput without spinning).
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    # Memory patterns cache one planned block per input shape; mixed lengths make many shapes,
    # and with two streams running at once the arena grew past 600 MB under mixed load
    # (measured: 613 MB after 80 s of 5-256-token traffic with patterns, 540 MB flat without;
    # throughput unchanged).
    options.enable_mem_pattern = False
    session = ort.InferenceSession(
        str(path), options, providers=session_providers(device), **session_options(device)
    )
    require_device(session, device)
    return session


# onnxruntime's words for a graph file that cannot be read as one (its class names no error).
_DAMAGE = ("INVALID_PROTOBUF", "NO_SUCHFILE", "Protobuf parsing failed", "External data path")


def _damaged(exc: FatalBackendError) -> bool:
    """Whether a cached graph failed to load because its files are damaged or missing."""
    return any(word in str(exc) for word in _DAMAGE)


def _sessions(
    path: Path, device: str, threads: int | None, solo_threads: int | None
) -> tuple[object, object | None]:
    """The serving session on ``path`` and, on the CPU with ``solo_threads``, the solo one."""
    try:
        if solo_threads is None or session_providers(device)[0] != "CPUExecutionProvider":
            return make_session(path, device, threads), None
        # The second session holds its own weights (all-MiniLM-L6-v2: +92-102 MB). Sharing
        # them through ``add_initializer`` saved only ~10 MB: the graph optimizer's fused
        # weights are per session anyway, and prepacking off made a pass 1.6x slower.
        session = make_session(path, device, threads, shared_arena=True)
        return session, make_session(path, device, solo_threads, shared_arena=True)
    except FatalBackendError:
        raise
    except Exception as exc:  # onnxruntime's errors share no base class to name
        raise FatalBackendError(f"cannot load the ONNX graph {path}: {exc}") from exc


_arena_lock = threading.Lock()
_arena_registered = False


def _register_shared_arena() -> None:
    """Give ONNX Runtime's environment one CPU arena (default settings), once per process."""
    global _arena_registered
    import onnxruntime as ort

    with _arena_lock:
        if not _arena_registered:
            memory = ort.OrtMemoryInfo(
                "Cpu", ort.OrtAllocatorType.ORT_ARENA_ALLOCATOR, 0, ort.OrtMemType.DEFAULT
            )
            ort.create_and_register_allocator(memory, ort.OrtArenaCfg({}))
            _arena_registered = True


class OnnxBackend:
    """Forward passes on one ONNX Runtime session, or two on the CPU.

    With ``solo`` (a second session on more intra-op threads, sharing the first one's arena),
    a pass that starts while no other is in flight runs there: at low load one request gets
    every core; under load the streams keep one core each. ``gate``: the process's core gate
    (``models/layout.py``), shared with every other local model, that each pass holds
    ``threads`` of and that says whether a pass is alone in the process; without one, the
    backend counts its own passes.
    """

    name = "onnx"
    run_tokens: int | None = RUN_TOKENS

    def __init__(
        self,
        session: object,
        *,
        pooling: Pooling,
        dtype: str,
        device: str,
        dim: int,
        solo: object | None = None,
        kind: ModelKind = ModelKind.EMBEDDING,
        gate: PassGate | None = None,
        threads: int = 1,
    ) -> None:
        self._session: object | None = session
        self._solo = solo
        if gate is None and solo is not None:
            gate = CoreGate(1 << 16)  # counts passes only: nothing else shares this one
        self._gate = gate
        self._threads = threads
        self._inputs = {i.name for i in session.get_inputs()}  # type: ignore[attr-defined]
        self.pooling = pooling
        self.dtype = dtype
        self.device = device
        self.dim = dim
        self.kind = kind

    @classmethod
    def load(
        cls,
        spec: ModelSpec,
        *,
        dtype: str,
        device: str,
        cache_dir: Path,
        threads: int | None = None,
        solo_threads: int | None = None,
        int8_min_cosine: float = 0.97,
        gate: PassGate | None = None,
    ) -> OnnxBackend:
        if dtype == "bfloat16":
            raise FatalBackendError("the onnx backend serves float32, float16 or int8")
        if dtype == "int8" and spec.kind is not ModelKind.EMBEDDING:
            raise FatalBackendError("int8 (with its quality gate) is for embedding models")

        session_providers(device)  # a missing CUDA provider is a setting's error: fail first
        export = partial(
            ensure_onnx,
            spec,
            dtype=dtype,
            cache_dir=cache_dir,
            threads=threads,
            min_quality=int8_min_cosine,
        )
        path, cached = export()
        logger.info("onnx model %s (%s)", path, "cached" if cached else "new export")
        try:
            session, solo = _sessions(path, device, threads, solo_threads)
        except FatalBackendError as exc:
            if not cached or not _damaged(exc):
                raise
            # A damaged entry (a truncated file, its data gone) would fail every start: export
            # it once more, in place of the damaged one. Not for other failures (memory, a
            # provider, a graph that loads but fails its checks): an export would not help,
            # and it would replace an entry other servers may be reading.
            logger.warning(
                "the cached ONNX export %s fails to load (%s): exporting again", path, exc
            )
            path, _ = export(replace=True)
            session, solo = _sessions(path, device, threads, solo_threads)
        providers = session.get_providers()  # type: ignore[attr-defined]
        actual = "cuda" if providers and providers[0] == "CUDAExecutionProvider" else "cpu"
        backend = cls(
            session,
            pooling=spec.pooling,
            dtype=dtype,
            device=actual,
            dim=spec.hidden_size,
            solo=solo,
            kind=spec.kind,
            gate=gate if actual == "cpu" else None,  # the gate shares CPU cores, not a GPU
            threads=threads or process_cores(),
        )
        try:
            backend._check(spec)
        except FatalBackendError:
            backend.close()
            raise
        return backend

    def _check(self, spec: ModelSpec) -> None:
        """Refuse a graph that cannot serve: inputs other than the tokenizer's arrays, or an
        output of the wrong shape in one tiny pass (on each session: it also warms them up)."""
        missing = {"input_ids", "attention_mask"} - self._inputs
        unknown = self._inputs - {"input_ids", "attention_mask", "token_type_ids"}
        if missing or unknown:
            raise FatalBackendError(
                f"the ONNX graph of {spec.model_id} takes inputs {sorted(self._inputs)}: it "
                "needs input_ids and attention_mask, and token_type_ids at most besides"
            )
        batch = warmup_batch(spec)
        feeds = self._feeds(batch, batch.input_ids.shape[1])
        for session in (self._session, self._solo):
            if session is None:
                continue
            try:
                out = session.run(None, feeds)[0]  # type: ignore[attr-defined]
            except Exception as exc:  # onnxruntime's errors share no base class to name
                raise FatalBackendError(
                    f"the ONNX graph of {spec.model_id} fails a warm-up pass: {exc}"
                ) from exc
            check_output("onnx", spec, np.shape(out))

    def embed(self, batch: TokenBatch) -> Floats:
        """Pooled vectors of the batch in one session run, whatever its size: the model's cost
        model sized it (``run_tokens``)."""
        require_kind(self.name, self.kind, ModelKind.EMBEDDING)
        return self._pooled(batch, int(batch.attention_mask.sum(axis=1).max()))

    def embed_all(self, batch: TokenBatch) -> list[Floats]:
        """Per-token hidden states, unpooled (TEI ``/embed_all``): one (tokens, dim) array per
        row, padding dropped. The batch runs whole: the model cuts token-level batches to its
        batch budget before they get here."""
        require_kind(self.name, self.kind, ModelKind.EMBEDDING)
        lengths = batch.attention_mask.sum(axis=1).tolist()
        hidden = self._forward(batch, max(lengths))
        return [
            np.ascontiguousarray(hidden[i, :n], dtype=np.float32) for i, n in enumerate(lengths)
        ]

    def score(self, batch: TokenBatch) -> Floats:
        """Raw relevance logits of a cross-encoder, one per (query, text) pair."""
        require_kind(self.name, self.kind, ModelKind.RERANKER)
        width = int(batch.attention_mask.sum(axis=1).max())
        scores: Floats = self._forward(batch, width)[:, 0].astype(np.float32)
        return scores

    def _pooled(self, batch: TokenBatch, width: int) -> Floats:
        return pool(self._forward(batch, width), batch.attention_mask[:, :width], self.pooling)

    def _forward(self, batch: TokenBatch, width: int) -> npt.NDArray[np.float32]:
        """The graph's first output for ``batch`` trimmed to ``width`` tokens."""
        feeds = self._feeds(batch, width)
        session = self._session
        if session is None:
            raise FatalBackendError("the onnx session is closed")
        solo, gate = self._solo, self._gate
        if gate is None:
            return np.asarray(session.run(None, feeds)[0])  # type: ignore[attr-defined]
        with gate.forward(self._threads) as alone:
            chosen = solo if alone and solo is not None else session
            return np.asarray(chosen.run(None, feeds)[0])  # type: ignore[attr-defined]

    def _feeds(self, batch: TokenBatch, width: int) -> dict[str, npt.NDArray[np.int64]]:
        feeds = {
            "input_ids": batch.input_ids[:, :width],
            "attention_mask": batch.attention_mask[:, :width],
        }
        if "token_type_ids" in self._inputs:
            feeds["token_type_ids"] = batch.token_type_ids[:, :width]
        return feeds

    def health(self) -> None:
        if self._session is None:
            raise FatalBackendError("the onnx session is closed")

    def close(self) -> None:
        self._session = self._solo = None
