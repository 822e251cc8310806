"""A provider's rerank lanes: remote rerank calls through the same batching engine as embeds.

Rerank APIs take one query per call, so callers merge like this:
- one lane (``Batcher``, FIFO, item = one (query, document) pair) per ``RerankParams``;
  its batch is cut at the provider's documents-per-call maximum, so a request with more
  documents than one call may carry is split over several calls, and each document's score
  still goes back to its own caller in order;
- where the provider caps the tokens of one rerank call (``max_rerank_tokens``: Voyage's
  "query tokens x documents + document tokens"), a pair costs its query's and its document's
  ``budget_tokens`` (else 1) and batches are cut by that budget too. A batch's queries go in
  calls of their own, so each call holds at most what its batch does: the budget bounds
  every call;
- a flushed batch is grouped by query: callers that sent the same query within ``max_wait_ms``
  share one upstream call (RAG fan-outs re-scoring one question), other queries get their own
  calls, run concurrently under the provider's one semaphore;
- a failed call fails only the documents it carried (the batch's other queries still answer);
- an answer's tokens are the upstream's count, shared among its documents by length, or, where
  the answer has none (Cohere's: search units only), each pair's estimate (``Pair.cost``).

The lanes are a ``lanes.LaneSet`` like the embedding lanes and go through the provider runtime's
``guard.UpstreamGuard`` (semaphore, circuit breaker, split on 413); the retry budget and the
attempt listener come with the adapter's transport, so rerank and embed calls to one provider
see one health and one concurrency cap. AIMD does not size rerank batches: its size counts texts
to embed, and a rerank call's price is set by the query count, not by its document count.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, NamedTuple

from embedplex.batching import BatchObserver
from embedplex.core.deadline import REQUEST_DEADLINE, bound_batch
from embedplex.core.spend import REQUEST_SPEND, estimated_tokens
from embedplex.core.types import RerankRequest, RerankResult
from embedplex.providers.base import Reranker, RerankParams, budget_tokens
from embedplex.providers.config import ProviderConfig
from embedplex.providers.guard import UpstreamGuard, token_shares
from embedplex.providers.http import CALL_FAILOVER, FAILOVER
from embedplex.providers.lanes import Lane, LaneSet, collect, timings

if TYPE_CHECKING:
    from opentelemetry.trace import SpanContext


class Pair(NamedTuple):
    """One queued document, its query, its caller's request span (None unless tracing), its
    caller's deadline (a ``time.monotonic()`` instant; None: none set) and whether its caller
    has another provider to go to (``http.FAILOVER``)."""

    query: str
    document: str
    trace: SpanContext | None
    deadline: float | None = None
    failover: bool = False

    @property
    def cost(self) -> int:
        """Its tokens as reserved, and as charged when its request ends without an answer
        (``core/spend.py``) or its upstream's answer gives no count (``_call``)."""
        return estimated_tokens(len(self.query) + len(self.document))

    @property
    def bound(self) -> int:
        """What a key's tpm reserves for it: the estimate (``Text.bound``)."""
        return self.cost


def _cost(pair: Pair) -> int:
    """A pair's weight against a token cap as vendors count rerank calls (the query is
    counted with every document): what a split after a refusal of the call's size cuts by."""
    return budget_tokens(pair.query) + budget_tokens(pair.document)


@dataclass(frozen=True, slots=True)
class Scored:
    """One document's share of an upstream answer."""

    score: float
    tokens: float


RerankLane = Lane[RerankParams, Pair, Scored]


class RerankLanes:
    """The rerank lanes of one provider (owned by its ``ProviderRuntime``)."""

    def __init__(
        self,
        config: ProviderConfig,
        reranker: Reranker,
        guard: UpstreamGuard,
        *,
        after: Callable[[], None] | None = None,
    ) -> None:
        self.config = config
        # Called after every upstream call: the runtime takes up limits the adapter learned.
        self._after = after
        self.name = config.name
        self.reranker = reranker
        self.health = guard.health
        self.counters = guard.counters
        self._guard = guard
        self._lanes: LaneSet[RerankParams, Pair, Scored] = LaneSet(
            config, self._run, self.counters, tag="rerank", created="rerank_lanes_created"
        )

    @property
    def lanes(self) -> dict[RerankParams, RerankLane]:
        return self._lanes.lanes

    @property
    def observers(self) -> list[BatchObserver]:
        return self._lanes.observers

    @observers.setter
    def observers(self, observers: list[BatchObserver]) -> None:
        self._lanes.observers = observers

    @property
    def ceiling(self) -> int:
        return max(1, self.reranker.limits.max_documents)

    @property
    def budget(self) -> int | None:
        """The tokens one batch's pairs may hold together (None: no cap)."""
        return self.reranker.limits.max_rerank_tokens

    def set_limits(self) -> None:
        """Cut every lane at the reranker's limits, learned anew (``_sync``)."""
        self._lanes.set_limits(self.ceiling, self.budget, self.ceiling)

    async def close(self, *, drain: bool = True) -> None:
        await self._lanes.close(drain=drain)

    async def sweep(self, idle_ttl: float) -> int:
        return await self._lanes.sweep(idle_ttl)

    # -- the batch function ----------------------------------------------------------------

    async def _run(self, batch: list[Pair], params: RerankParams) -> list[Scored | BaseException]:
        groups: dict[str, list[int]] = {}
        for i, pair in enumerate(batch):
            groups.setdefault(pair.query, []).append(i)
        answers = await asyncio.gather(
            *(self._call([batch[i] for i in idx], params) for idx in groups.values()),
            return_exceptions=True,
        )
        out: dict[int, Scored | BaseException] = {}
        for idx, answer in zip(groups.values(), answers, strict=True):
            for j, i in enumerate(idx):
                out[i] = answer if isinstance(answer, BaseException) else answer[j]
        return [out[i] for i in range(len(batch))]

    async def _call(self, pairs: list[Pair], params: RerankParams) -> list[Scored | BaseException]:
        """Upstream calls for documents of one query: one, or more after a 413 (``guard``)."""
        # As for embeddings: no retry outlasts the most patient caller (``core/deadline.py``).
        # Each query's call runs in a task of its own (``_run``), so this sets only its own.
        bound_batch([p.deadline for p in pairs])
        CALL_FAILOVER.set(all(p.failover for p in pairs))  # a 429: wait it out? (``http.py``)

        async def send(part: list[Pair]) -> list[Scored]:
            documents = [p.document for p in part]
            traces = [p.trace for p in part if p.trace is not None]
            try:
                out = await self.reranker.rerank(part[0].query, documents, params, traces=traces)
            finally:
                if self._after is not None:
                    self._after()
            self.counters["upstream_rerank_calls"] += 1
            self.counters["documents"] += len(documents)
            if out.tokens is None:
                # No count in the answer (Cohere bills search units; a TEI whose headers a
                # proxy dropped): each pair costs its estimate, what its request reserved, so
                # the key's tpm holds and the settling refunds nothing (docs/limits.md).
                shares = [float(p.cost) for p in part]
            else:
                shares = token_shares(out.tokens, documents)
            return [Scored(s, t) for s, t in zip(out.scores, shares, strict=True)]

        return await self._guard.call(pairs, send, _cost)

    async def probe(self, text: str) -> None:
        """``text`` against itself in one upstream call, outside the lanes (the router's
        health probe: ``ProviderRuntime.probe``)."""
        params = RerankParams.from_request(RerankRequest(query=text, texts=[text]))
        await self._call([Pair(text, text, None)], params)

    async def rerank(self, request: RerankRequest, trace: SpanContext | None) -> RerankResult:
        """Queue every document of ``request`` in its lane and wait for all their scores."""
        start = time.perf_counter()
        params = RerankParams.from_request(request)
        self.reranker.check_rerank(params)
        budget = self.budget
        lane = await self._lanes.lane(params, ceiling=self.ceiling, max_cost=budget)
        deadline = REQUEST_DEADLINE.get()
        at = deadline.at if deadline is not None else None
        failover = FAILOVER.get()
        pairs = [Pair(request.query, d, trace, at, failover) for d in request.texts]
        if budget is None:
            costs = [1] * len(pairs)
        else:  # as ``_cost``, the query's share reckoned once
            q = budget_tokens(request.query)
            costs = [q + budget_tokens(d) for d in request.texts]
        spend = REQUEST_SPEND.get()  # a key with tpm reserves first (core/spend.py)
        if spend is None:
            items = lane.batcher.submit(pairs, costs, trace=trace, tenant=request.tenant)
        else:
            items = await spend.queue(
                sum(p.bound for p in pairs),
                lambda: lane.batcher.submit(pairs, costs, trace=trace, tenant=request.tenant),
            )
        rows = await collect(items, self.counters, "rerank_requests")
        took = timings(items, start)
        return RerankResult(
            scores=[row.score for row in rows],
            prompt_tokens=round(sum(row.tokens for row in rows)),
            model=self.reranker.rerank_model,
            provider=self.name,
            timings=took,
        )

    def stats(self) -> dict[str, Any]:
        return {
            "max_documents_per_call": self.ceiling,
            "max_tokens_per_call": self.budget,
            **self._lanes.totals(),
            "lanes": self._lanes.describe(),
        }
