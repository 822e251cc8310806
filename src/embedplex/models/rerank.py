"""A local reranker (cross-encoder): (query, text) pairs -> relevance scores."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from embedplex.backends.base import TokenBatch
from embedplex.backends.tokenizer import Encoded
from embedplex.core.errors import BackendError
from embedplex.core.types import RerankRequest, RerankResult
from embedplex.models.local import LocalModel


@dataclass(frozen=True, slots=True)
class Scored:
    """One (query, text) pair's raw logit and its token count."""

    logit: float
    tokens: int


class LocalRerankModel(LocalModel[Scored]):
    """Each text of a request becomes one (query, text) item in the same batching engine."""

    def _forward(self, batch: TokenBatch) -> list[Scored]:
        lengths = batch.attention_mask.sum(axis=1).tolist()
        return [
            Scored(float(x), n) for x, n in zip(self.backend.score(batch), lengths, strict=True)
        ]

    def _encode(self, request: RerankRequest) -> list[Encoded]:
        return self.tokenizer.encode_pairs(
            request.query,
            request.texts,
            truncate=self._truncate(request.truncate),
            direction=request.truncation_direction,
        )

    async def rerank(self, request: RerankRequest) -> RerankResult:
        self._check_size(len(request.texts), "texts")
        # The query is tokenized once for all its pairs (``encode_pairs``).
        chars = len(request.query) + sum(len(t) for t in request.texts)
        done = await self._process(
            lambda: self._encode(request),
            chars,
            tenant=request.tenant,
            inputs=len(request.texts),
        )
        logits = np.asarray([r.logit for r in done.results], dtype=np.float64)
        if not np.isfinite(logits).all():
            # A NaN cannot be ranked (it scrambles the sort of every other score, and JSON
            # has no NaN: it would reach the caller as null). TEI answers 424 "score is NaN".
            bad = int(np.flatnonzero(~np.isfinite(logits))[0])
            raise BackendError(f"the model scored text {bad} as {logits[bad]}: not a number")
        # Single-logit cross-encoders are trained with a sigmoid head (sentence-transformers'
        # CrossEncoder applies it by default, and so does TEI unless raw_scores is set).
        scores = logits if request.raw_scores else 1.0 / (1.0 + np.exp(-logits))
        return RerankResult(
            scores=[float(s) for s in scores],
            prompt_tokens=sum(r.tokens for r in done.results),
            model=self.options.name,
            timings=done.timings(),
        )
