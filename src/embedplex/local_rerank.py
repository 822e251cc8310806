"""A local reranker (cross-encoder): (query, text) pairs -> relevance scores."""

from __future__ import annotations

import numpy as np

from embedplex.backends.base import TokenBatch
from embedplex.backends.tokenizer import Encoded
from embedplex.local_model import LocalModel
from embedplex.service import RerankRequest, RerankResult


class LocalRerankModel(LocalModel[float]):
    """Each text of a request becomes one (query, text) item in the same batching engine."""

    def _forward(self, batch: TokenBatch) -> list[float]:
        return [float(x) for x in self.backend.score(batch)]

    def _encode(self, request: RerankRequest) -> list[Encoded]:
        return self.tokenizer.encode_pairs(
            request.query,
            request.texts,
            truncate=self._truncate(request.truncate),
            direction=request.truncation_direction,
        )

    async def rerank(self, request: RerankRequest) -> RerankResult:
        self._check_size(len(request.texts), "texts")
        chars = len(request.query) * len(request.texts) + sum(len(t) for t in request.texts)
        done = await self._process(lambda: self._encode(request), chars)
        logits = np.asarray(done.results, dtype=np.float64)
        # Single-logit cross-encoders are trained with a sigmoid head (sentence-transformers'
        # CrossEncoder applies it by default, and so does TEI unless raw_scores is set).
        scores = logits if request.raw_scores else 1.0 / (1.0 + np.exp(-logits))
        return RerankResult(
            scores=[float(s) for s in scores],
            prompt_tokens=done.tokens,
            model=self.options.name,
            timings=done.timings(),
        )
