"""A provider's rerank lanes: remote rerank calls through the same batching engine as embeds.

Rerank APIs take one query per call, so callers merge like this:
- one lane (``Batcher``, FIFO, item = one (query, document) pair, cost 1) per ``RerankParams``;
  its batch is cut at the provider's documents-per-call maximum, so a request with more
  documents than one call may carry is split over several calls, and each document's score
  still goes back to its own caller in order;
- a flushed batch is grouped by query: callers that sent the same query within ``max_wait_ms``
  share one upstream call (RAG fan-outs re-scoring one question), other queries get their own
  calls, run concurrently under the provider's one semaphore;
- a failed call fails only the documents it carried (the batch's other queries still answer).

The lanes share the provider runtime's semaphore, circuit breaker, retry budget and (through
the adapter's transport) its attempt listener, so rerank and embed calls to one provider see
one health and one concurrency cap. AIMD does not size rerank batches: its size counts texts to
embed, and a rerank call's price is set by the query count, not by its document count.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, NamedTuple

from embedplex.batching import Batcher, BatchObserver, BatchPolicy, FifoQueue
from embedplex.core.errors import UnavailableError, UpstreamError
from embedplex.core.types import RerankRequest, RerankResult, Timings
from embedplex.providers.base import Reranker, RerankParams, Scores
from embedplex.providers.config import ProviderConfig
from embedplex.providers.health import ProviderHealth

if TYPE_CHECKING:
    from opentelemetry.trace import SpanContext


class Pair(NamedTuple):
    """One queued document, its query and its caller's request span (None unless tracing)."""

    query: str
    document: str
    trace: SpanContext | None


@dataclass(frozen=True, slots=True)
class Scored:
    """One document's share of an upstream answer."""

    score: float
    tokens: float


@dataclass(slots=True)
class RerankLane:
    key: RerankParams
    batcher: Batcher[Pair, Scored]
    last_used: float = field(default_factory=time.monotonic)


class RerankLanes:
    """The rerank lanes of one provider (owned by its ``ProviderRuntime``)."""

    def __init__(
        self,
        config: ProviderConfig,
        reranker: Reranker,
        health: ProviderHealth,
        semaphore: asyncio.Semaphore,
        counters: Counter[str],
    ) -> None:
        self.config = config
        self.name = config.name
        self.reranker = reranker
        self.health = health
        self.counters = counters
        self.observers: list[BatchObserver] = []
        self.lanes: dict[RerankParams, RerankLane] = {}
        self._semaphore = semaphore

    @property
    def ceiling(self) -> int:
        return max(1, self.reranker.limits.max_documents)

    async def close(self, *, drain: bool = True) -> None:
        lanes, self.lanes = list(self.lanes.values()), {}
        await asyncio.gather(*(lane.batcher.close(drain=drain) for lane in lanes))

    async def sweep(self, idle_ttl: float) -> int:
        now = time.monotonic()
        gone = [
            key
            for key, lane in self.lanes.items()
            if lane.batcher.idle and now - lane.last_used >= idle_ttl
        ]
        lanes = [self.lanes.pop(key) for key in gone]
        await asyncio.gather(*(lane.batcher.close() for lane in lanes))
        return len(lanes)

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

    async def _call(self, pairs: list[Pair], params: RerankParams) -> list[Scored]:
        """One upstream call for documents of one query (split in two on a 413)."""
        if not self.health.acquire():
            raise UnavailableError(
                f"provider {self.name}: circuit is {self.health.state.value}; "
                f"next probe in {self.health.retry_in:.1f}s"
            )
        documents = [p.document for p in pairs]
        traces = [p.trace for p in pairs if p.trace is not None]
        out: Scores | None = None
        async with self._semaphore:
            try:
                out = await self.reranker.rerank(pairs[0].query, documents, params, traces=traces)
            except UpstreamError as exc:
                if exc.status != 413 or len(documents) < 2:
                    raise
        if out is None:
            self.counters["splits"] += 1
            half = len(pairs) // 2
            left, right = await asyncio.gather(
                self._call(pairs[:half], params), self._call(pairs[half:], params)
            )
            return left + right
        self.counters["upstream_rerank_calls"] += 1
        self.counters["documents"] += len(documents)
        total = sum(len(d) for d in documents) or 1
        tokens = float(out.tokens or 0)
        # Billed tokens are per call; hand each document a share by length for usage reporting.
        return [
            Scored(s, tokens * len(d) / total) for s, d in zip(out.scores, documents, strict=True)
        ]

    async def _lane(self, params: RerankParams) -> RerankLane:
        lane = self.lanes.get(params)
        if lane is None:
            policy = BatchPolicy(
                max_items=self.ceiling,
                max_wait=self.config.max_wait_ms / 1000,
                max_concurrency=self.config.max_concurrency,
                max_queued=self.config.max_queued,
                queue_timeout=self.config.queue_timeout_ms / 1000,
            )

            async def run(batch: list[Pair]) -> list[Scored | BaseException]:
                return await self._run(batch, params)

            batcher: Batcher[Pair, Scored] = Batcher(
                f"{self.name}#rerank{self.counters['rerank_lanes_created']}",
                run,
                policy,
                queue=FifoQueue(),
                observers=self.observers,
            )
            lane = self.lanes[params] = RerankLane(params, batcher)
            await batcher.start()  # only creates the loop task: no suspension point
            self.counters["rerank_lanes_created"] += 1
        lane.last_used = time.monotonic()
        return lane

    async def rerank(self, request: RerankRequest, trace: SpanContext | None) -> RerankResult:
        """Queue every document of ``request`` in its lane and wait for all their scores."""
        start = time.perf_counter()
        params = RerankParams.from_request(request)
        self.reranker.check_rerank(params)
        lane = await self._lane(params)
        pairs = [Pair(request.query, d, trace) for d in request.texts]
        items = lane.batcher.submit(pairs, [1] * len(pairs), trace=trace)
        self.counters["rerank_requests"] += 1
        try:
            rows = await asyncio.gather(*(item.future for item in items))
        except BaseException:
            self.counters["rerank_requests_failed"] += 1
            raise
        finally:
            for item in items:
                item.future.cancel()  # no-op when done; drops the rest if we failed or left
        end = time.perf_counter()
        return RerankResult(
            scores=[row.score for row in rows],
            prompt_tokens=round(sum(row.tokens for row in rows)),
            model=self.reranker.rerank_model,
            provider=self.name,
            timings=Timings(
                queue=max(i.started_at - i.enqueued_at for i in items) * 1000,
                inference=max(i.finished_at - i.started_at for i in items) * 1000,
                total=(end - start) * 1000,
            ),
        )

    def stats(self) -> dict[str, Any]:
        lanes = list(self.lanes.values())
        return {
            "max_documents_per_call": self.ceiling,
            "queued": sum(lane.batcher.queued for lane in lanes),
            "in_flight_batches": sum(lane.batcher.in_flight for lane in lanes),
            "batches": sum(lane.batcher.batches_run for lane in lanes),
            "lanes": [
                {
                    "key": lane.key.describe(),
                    "queued": lane.batcher.queued,
                    "in_flight": lane.batcher.in_flight,
                    "batches": lane.batcher.batches_run,
                    "idle_s": round(time.monotonic() - lane.last_used, 3),
                }
                for lane in lanes
            ],
        }
