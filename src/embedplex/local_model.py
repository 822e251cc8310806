"""A local model served through the batching engine: tokenizer -> batcher -> backend."""

from __future__ import annotations

import asyncio
import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from embedplex.backends.base import EmbeddingBackend, TokenBatch
from embedplex.backends.model_files import ModelSpec, Pooling, load_spec, resolve_model_dir
from embedplex.backends.onnx_export import default_cache_dir
from embedplex.backends.pooling import normalize_rows
from embedplex.backends.tokenizer import Encoded, TextTokenizer, Token
from embedplex.batching import Batcher, BatchObserver, BatchPolicy, LengthBucketQueue
from embedplex.config import Settings
from embedplex.errors import (
    EmptyInputError,
    InvalidRequestError,
    OverloadedError,
    PayloadTooLargeError,
)
from embedplex.service import EmbedRequest, EmbedResult, ModelInfo, Timings, Vector

logger = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True)
class LocalModelOptions:
    """The serving knobs of one local model (a slice of ``Settings``)."""

    name: str
    auto_truncate: bool = False
    default_prompt: str | None = None
    max_client_batch_size: int = 2048
    max_concurrent_requests: int = 512
    tokenization_workers: int | None = None
    policy: BatchPolicy = field(default_factory=lambda: BatchPolicy(max_items=128, max_cost=16384))

    @classmethod
    def from_settings(cls, settings: Settings, spec: ModelSpec) -> LocalModelOptions:
        prompt = settings.default_prompt
        name = settings.default_prompt_name or spec.default_prompt_name
        if prompt is None and name is not None:
            if name not in spec.prompts:
                raise ValueError(
                    f"default prompt name {name!r} is not among {sorted(spec.prompts)}"
                )
            prompt = spec.prompts[name]
        return cls(
            name=settings.model_name,
            auto_truncate=settings.auto_truncate,
            default_prompt=prompt,
            max_client_batch_size=settings.max_client_batch_size,
            max_concurrent_requests=settings.max_concurrent_requests,
            tokenization_workers=settings.tokenization_workers,
            policy=BatchPolicy(
                max_items=settings.max_batch_requests,
                max_cost=max(settings.max_batch_tokens, spec.max_input_length),
                max_wait=0.0,
                max_concurrency=1,
                max_queued=settings.max_queue_size,
                queue_timeout=settings.queue_timeout_ms / 1000,
            ),
        )


def load_backend(settings: Settings, spec: ModelSpec) -> EmbeddingBackend:
    if settings.backend == "torch":
        from embedplex.backends.pytorch import TorchBackend

        return TorchBackend.load(
            spec, dtype=settings.dtype, device=settings.device, threads=settings.inference_threads
        )
    from embedplex.backends.onnx import OnnxBackend

    return OnnxBackend.load(
        spec,
        dtype=settings.dtype,
        device=settings.device,
        cache_dir=settings.cache_dir or default_cache_dir(),
        threads=settings.inference_threads,
        int8_min_cosine=settings.int8_min_cosine,
    )


class LocalEmbeddingModel:
    def __init__(
        self,
        spec: ModelSpec,
        tokenizer: TextTokenizer,
        backend: EmbeddingBackend,
        options: LocalModelOptions,
        *,
        observers: list[BatchObserver] | None = None,
        pad_id: int = 0,
    ) -> None:
        self.spec = spec
        self.tokenizer = tokenizer
        self.backend = backend
        self.options = options
        self._pad_id = pad_id
        self._observers = observers or []
        self._active = 0
        self._infer_pool: ThreadPoolExecutor | None = None
        self._token_pool: ThreadPoolExecutor | None = None
        self._batcher: Batcher[Encoded, Vector] | None = None
        self._info = ModelInfo(
            name=options.name,
            model_id=spec.model_id,
            sha=spec.sha,
            backend=backend.name,
            device=backend.device,
            dtype=backend.dtype,
            dim=backend.dim,
            pooling=spec.pooling.value,
            max_input_length=spec.max_input_length,
            prompts=spec.prompts,
        )

    @classmethod
    def load(
        cls, settings: Settings, *, observers: list[BatchObserver] | None = None
    ) -> LocalEmbeddingModel:
        """Resolve, read and load the configured model (blocking I/O; call from a thread)."""
        path, sha = resolve_model_dir(
            settings.model_id, revision=settings.revision, cache_dir=settings.cache_dir
        )
        spec = load_spec(
            settings.model_id,
            path,
            revision=settings.revision,
            sha=sha,
            pooling=Pooling(settings.pooling) if settings.pooling else None,
            max_input_length=settings.max_input_length,
        )
        tokenizer = TextTokenizer.from_dir(
            path, max_length=spec.max_input_length, vocab_size=spec.vocab_size
        )
        backend = load_backend(settings, spec)
        pad_id = _pad_id(path)
        return cls(
            spec,
            tokenizer,
            backend,
            LocalModelOptions.from_settings(settings, spec),
            observers=observers,
            pad_id=pad_id,
        )

    @property
    def info(self) -> ModelInfo:
        return self._info

    @property
    def batcher(self) -> Batcher[Encoded, Vector]:
        if self._batcher is None:
            raise RuntimeError("model not started")
        return self._batcher

    async def start(self) -> None:
        workers = self.options.tokenization_workers or os.cpu_count() or 1
        self._token_pool = ThreadPoolExecutor(workers, thread_name_prefix="tokenize")
        self._infer_pool = ThreadPoolExecutor(1, thread_name_prefix="inference")
        self._batcher = Batcher(
            self.options.name,
            self._run_batch,
            self.options.policy,
            queue=LengthBucketQueue(),
            observers=self._observers,
        )
        await self._batcher.start()

    async def close(self, *, drain: bool = True) -> None:
        if self._batcher is not None:
            await self._batcher.close(drain=drain)
        for pool in (self._token_pool, self._infer_pool):
            if pool is not None:
                pool.shutdown(wait=False, cancel_futures=True)
        self.backend.close()

    def health(self) -> None:
        self.backend.health()
        if self._batcher is not None and self._batcher.fatal is not None:
            raise self._batcher.fatal

    def stats(self) -> dict[str, Any]:
        b = self._batcher
        return {
            "active_requests": self._active,
            "queued": b.queued if b else 0,
            "in_flight_batches": b.in_flight if b else 0,
            "batches": b.batches_run if b else 0,
            "max_batch_requests": b.max_items if b else 0,
        }

    async def _run_batch(self, payloads: list[Encoded]) -> list[Vector]:
        loop = asyncio.get_running_loop()
        pad_id = self._pad_id

        def forward() -> list[Vector]:
            out = self.backend.embed(TokenBatch.collate(payloads, pad_id))
            return list(out)

        return await loop.run_in_executor(self._infer_pool, forward)

    # -- requests --------------------------------------------------------------------------

    def _prompt(self, request: EmbedRequest) -> str | None:
        if request.prompt is not None:
            return request.prompt
        if request.prompt_name is not None:
            if request.prompt_name not in self.spec.prompts:
                known = ", ".join(sorted(self.spec.prompts)) or "none"
                raise InvalidRequestError(
                    f"unknown prompt_name {request.prompt_name!r} (this model has: {known})",
                    param="prompt_name",
                )
            return self.spec.prompts[request.prompt_name]
        return self.options.default_prompt

    def _validate(self, request: EmbedRequest) -> None:
        n = len(request.inputs)
        if n == 0:
            raise EmptyInputError("input cannot be empty", param="input")
        if n > self.options.max_client_batch_size:
            raise PayloadTooLargeError(
                f"batch size {n} > maximum allowed batch size {self.options.max_client_batch_size}",
                param="input",
            )
        dims = request.dimensions
        if dims is not None and not 1 <= dims <= self.backend.dim:
            raise InvalidRequestError(
                f"dimensions must be between 1 and {self.backend.dim}, got {dims}",
                param="dimensions",
            )

    def _encode(self, request: EmbedRequest, truncate: bool) -> list[Encoded]:
        direction = request.truncation_direction
        if request.is_tokens:
            ids: list[list[int]] = request.inputs  # type: ignore[assignment]
            return self.tokenizer.encode_ids(ids, truncate=truncate, direction=direction)
        texts: list[str] = request.inputs  # type: ignore[assignment]
        prompt = self._prompt(request)
        if prompt:
            texts = [prompt + text for text in texts]
        return self.tokenizer.encode(texts, truncate=truncate, direction=direction)

    async def embed(self, request: EmbedRequest) -> EmbedResult:
        start = time.perf_counter()
        self._validate(request)
        if self._active >= self.options.max_concurrent_requests:
            raise OverloadedError(
                f"{self._active} requests in flight (max_concurrent_requests is "
                f"{self.options.max_concurrent_requests})"
            )
        self._active += 1
        try:
            truncate = self.options.auto_truncate if request.truncate is None else request.truncate
            if _small(request):
                # Cheaper here than the two thread hand-offs it would take (see INLINE_CHARS).
                encoded = self._encode(request, truncate)
            else:
                loop = asyncio.get_running_loop()
                encoded = await loop.run_in_executor(
                    self._token_pool, self._encode, request, truncate
                )
            tokenized = time.perf_counter()
            items = self.batcher.submit(encoded, [len(e) for e in encoded])
            try:
                rows = await asyncio.gather(*(item.future for item in items))
            finally:
                for item in items:
                    item.future.cancel()  # no-op when done; drops the rest if we failed or left
        finally:
            self._active -= 1
        matrix = np.stack(rows)
        if request.dimensions is not None:
            matrix = matrix[:, : request.dimensions]
        if request.normalize:
            matrix = normalize_rows(matrix)
        end = time.perf_counter()
        queue_ms = max(item.started_at - item.enqueued_at for item in items) * 1000
        infer_ms = max(item.finished_at - item.started_at for item in items) * 1000
        return EmbedResult(
            vectors=list(matrix),
            prompt_tokens=sum(len(e) for e in encoded),
            model=self.options.name,
            timings=Timings(
                tokenization=(tokenized - start) * 1000,
                queue=queue_ms,
                inference=infer_ms,
                total=(end - start) * 1000,
            ),
        )

    async def tokenize(
        self, texts: list[str], *, add_special_tokens: bool = True, prompt_name: str | None = None
    ) -> list[list[Token]]:
        if not texts:
            raise EmptyInputError("inputs cannot be empty", param="inputs")
        prompt = self._prompt(EmbedRequest(inputs=texts, prompt_name=prompt_name))
        if prompt:
            texts = [prompt + t for t in texts]
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(
            self._token_pool,
            lambda: self.tokenizer.tokens(texts, add_special_tokens=add_special_tokens),
        )


# Requests with at most this many characters in all are tokenized on the event loop: a short
# text takes tens of microseconds, less than handing it to the pool and back.
INLINE_CHARS = 512


def _small(request: EmbedRequest) -> bool:
    if request.is_tokens:
        return False
    total = 0
    for text in request.inputs:
        total += len(text)
        if total > INLINE_CHARS:
            return False
    return True


def _pad_id(path: Any) -> int:
    import json
    from pathlib import Path

    cfg = Path(path) / "config.json"
    try:
        value = json.loads(cfg.read_text()).get("pad_token_id")
    except (OSError, ValueError):
        return 0
    return int(value) if isinstance(value, int) else 0
