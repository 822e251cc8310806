"""Per-token hidden states of a local embedding model, unpooled (TEI ``/embed_all``).

A ``LocalTokenModel`` uses the pooled model's tokenizer, backend and threads, behind a batcher
of its own: its results are (tokens, dim) matrices, not vectors, so its inputs cannot ride in the
pooled model's batches, but the two batchers take turns on the same inference threads instead of
running twice as many passes at once on the same cores. It is made on the first ``/embed_all``
request (most servers never see one) and closed with the pooled model.
"""

from __future__ import annotations

import typing
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import numpy.typing as npt

from embedplex.backends.base import TokenBatch
from embedplex.backends.tokenizer import Encoded
from embedplex.core.errors import InvalidRequestError, PayloadTooLargeError
from embedplex.core.types import EmbedRequest, TokenEmbedResult
from embedplex.models.local import LocalModel

if TYPE_CHECKING:
    from embedplex.models.embedding import LocalEmbeddingModel

# The most numbers (tokens x dimensions) one response may hold: 8,388,608 floats are 32 MiB in
# memory and some 80-90 MB of JSON. A token-level answer is dim times bigger than a pooled one,
# so it is bounded by what it returns rather than by its input count alone.
MAX_NUMBERS = 1 << 23


@dataclass(frozen=True, slots=True)
class TokenVectors:
    """One input's per-token vectors, shape (tokens, dim)."""

    vectors: npt.NDArray[np.float32]


class LocalTokenModel(LocalModel[TokenVectors]):
    """Token-level twin of a ``LocalEmbeddingModel`` (same spec, options and observers)."""

    def __init__(self, pooled: LocalEmbeddingModel) -> None:
        super().__init__(
            pooled.spec,
            pooled.tokenizer,
            pooled.backend,
            pooled.options,
            observers=pooled._observers,
        )
        self._pooled = pooled
        if not callable(getattr(pooled.backend, "embed_all", None)):
            raise InvalidRequestError(
                f"the {pooled.backend.name} backend cannot return token embeddings", param="model"
            )

    async def start(self) -> None:
        pooled = self._pooled
        pooled.batcher  # noqa: B018 -- raises unless the pooled model (and its threads) started
        self._token_pool = pooled._token_pool
        self._infer_pool = pooled._infer_pool
        await self._start_batcher()

    async def close(self, *, drain: bool = True) -> None:
        # The threads and the backend belong to the pooled model, which closes them.
        if self._batcher is not None:
            await self._batcher.close(drain=drain)

    def _forward(self, batch: TokenBatch) -> list[TokenVectors]:
        return [TokenVectors(v) for v in self.backend.embed_all(batch)]

    def _bounded(self, encoded: list[Encoded]) -> list[Encoded]:
        tokens = sum(len(e) for e in encoded)
        if tokens * self.backend.dim > MAX_NUMBERS:
            raise PayloadTooLargeError(
                f"{tokens} tokens x {self.backend.dim} dimensions ({tokens * self.backend.dim} "
                f"numbers) is more than the {MAX_NUMBERS} one /embed_all answer may hold; send "
                "fewer or shorter inputs",
                param="inputs",
            )
        return encoded

    async def embed_all(self, request: EmbedRequest) -> TokenEmbedResult:
        """Every token's vector (special tokens included), not normalized, as TEI gives them."""
        self._check_size(len(request.inputs), "inputs")
        truncate = self._truncate(request.truncate)
        direction = request.truncation_direction
        if request.is_tokens:
            ids = typing.cast(list[list[int]], request.inputs)
            done = await self._process(
                lambda: self._bounded(
                    self.tokenizer.encode_ids(ids, truncate=truncate, direction=direction)
                ),
                sum(len(s) for s in ids),
                tenant=request.tenant,
                inputs=len(ids),
            )
        else:
            texts = self._pooled._texts(request)
            # Tokenized before queuing (never deferred), so that the size bound holds up front.
            done = await self._process(
                lambda: self._bounded(
                    self.tokenizer.encode(texts, truncate=truncate, direction=direction)
                ),
                sum(len(t) for t in texts),
                tenant=request.tenant,
                inputs=len(texts),
            )
        return TokenEmbedResult(
            vectors=[r.vectors for r in done.results],
            prompt_tokens=sum(len(r.vectors) for r in done.results),
            model=self.options.name,
            timings=done.timings(),
        )
