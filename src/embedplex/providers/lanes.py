"""Batch lanes by key: one ``Batcher`` per parameter set, made on first use, swept when idle.

A provider's embeddings (``runtime``, keyed by ``EmbedParams``) and its reranks
(``rerank_lanes``, keyed by ``RerankParams``) are batched the same way; ``LaneSet`` is that way,
written once: inputs that would change the upstream call never share a lane, lanes are created
on first use and closed once idle for ``idle_ttl`` seconds (odd parameter mixes cannot grow
memory without bound). ``collect`` and ``timings`` are the caller's side of one request: wait
for its items, count it, drop what is left if it failed or its caller went.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Hashable, Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, Protocol, TypeVar

from embedplex.batching import Batcher, BatchObserver, BatchPolicy, Item, make_queue
from embedplex.core.tenant import Tenant
from embedplex.core.types import Timings
from embedplex.providers.config import ProviderConfig


class LaneKey(Hashable, Protocol):
    """What a lane is keyed by (``EmbedParams``, ``RerankParams``)."""

    def describe(self) -> dict[str, Any]: ...


K = TypeVar("K", bound=LaneKey)
P = TypeVar("P")
R = TypeVar("R")

# The batch function of a lane: its batch and the lane's key (the upstream call's parameters).
RunLane = Callable[[list[P], K], Awaitable[Sequence[R | BaseException]]]


@dataclass(slots=True)
class Lane(Generic[K, P, R]):
    key: K
    batcher: Batcher[P, R]
    last_used: float = field(default_factory=time.monotonic)
    # What a payload queued again becomes (``requeue``); None: itself.
    renew: Callable[[P], P] | None = None

    def requeue(self, item: Item[P, R], tenant: Tenant) -> Item[P, R]:
        """Queue a dropped item's payload again, for the callers that joined it
        (``models/dedupe.py``: its leader left, they still wait)."""
        payload = item.payload if self.renew is None else self.renew(item.payload)
        return self.batcher.submit(
            [payload], [item.cost], trace=item.trace, tenant=tenant, admitted=True
        )[0]


class LaneSet(Generic[K, P, R]):
    """The lanes of one kind of call to one provider.

    ``tag`` goes into each batcher's name after the provider's (``name#3``, ``name#rerank0``);
    ``created`` is the counter that numbers them, in the provider's shared ``counters``.
    """

    def __init__(
        self,
        config: ProviderConfig,
        run: RunLane[P, K, R],
        counters: Counter[str],
        *,
        tag: str = "",
        created: str = "lanes_created",
        renew: Callable[[P], P] | None = None,
    ) -> None:
        self.config = config
        self.name = config.name
        self.lanes: dict[K, Lane[K, P, R]] = {}
        self.observers: list[BatchObserver] = []
        self._run = run
        self._counters = counters
        self._tag = tag
        self._created = created
        self._renew = renew

    def existing(self, key: K) -> Lane[K, P, R] | None:
        """The lane of ``key`` if it has one (marked used), without a coroutine: the way every
        request but a lane's first goes."""
        lane = self.lanes.get(key)
        if lane is not None:
            lane.last_used = time.monotonic()
        return lane

    async def lane(
        self, key: K, *, ceiling: int, size: int | None = None, max_cost: int | None = None
    ) -> Lane[K, P, R]:
        """The lane of ``key`` (made now if it has none); ``size`` starts it below ``ceiling``;
        ``max_cost``: what one batch's items may cost together (None: no budget)."""
        lane = self.lanes.get(key)
        if lane is None:
            config = self.config
            policy = BatchPolicy(
                max_items=ceiling,
                max_cost=max_cost,
                max_wait=config.max_wait_ms / 1000,
                max_quiet=config.max_quiet_ms / 1000,
                max_concurrency=config.max_concurrency,
                max_queued=config.max_queued,
                queue_timeout=config.queue_timeout_ms / 1000,
                cancel_abandoned=True,  # no upstream call (or retry) goes on for nobody
            )

            async def run(batch: list[P]) -> Sequence[R | BaseException]:
                return await self._run(batch, key)

            batcher: Batcher[P, R] = Batcher(
                f"{self.name}#{self._tag}{self._counters[self._created]}",
                run,
                policy,
                queue=make_queue(config.queue_policy, lengths=False),
                observers=self.observers,
            )
            if size is not None:
                batcher.set_max_items(size)
            lane = self.lanes[key] = Lane(key, batcher, renew=self._renew)
            await batcher.start()  # only creates the loop task: no suspension point
            self._counters[self._created] += 1
        lane.last_used = time.monotonic()
        return lane

    def set_max_items(self, n: int) -> None:
        """Resize every lane's batches (AIMD)."""
        for lane in self.lanes.values():
            lane.batcher.set_max_items(n)

    def set_limits(self, ceiling: int, max_cost: int | None, size: int) -> None:
        """New limits for every lane (the upstream's, learned at run time), at ``size``."""
        for lane in self.lanes.values():
            lane.batcher.set_limits(ceiling, max_cost)
            lane.batcher.set_max_items(size)

    async def close(self, *, drain: bool = True) -> None:
        lanes, self.lanes = list(self.lanes.values()), {}
        await asyncio.gather(*(lane.batcher.close(drain=drain) for lane in lanes))

    async def sweep(self, idle_ttl: float) -> int:
        """Close lanes idle for ``idle_ttl`` seconds; return how many went."""
        now = time.monotonic()
        gone = [
            key
            for key, lane in self.lanes.items()
            if lane.batcher.idle and now - lane.last_used >= idle_ttl
        ]
        lanes = [self.lanes.pop(key) for key in gone]
        await asyncio.gather(*(lane.batcher.close() for lane in lanes))
        return len(lanes)

    def totals(self) -> dict[str, int]:
        """Queued items, batches in flight and batches run, over all lanes (status pages)."""
        lanes = list(self.lanes.values())
        return {
            "queued": sum(lane.batcher.queued for lane in lanes),
            "in_flight_batches": sum(lane.batcher.in_flight for lane in lanes),
            "batches": sum(lane.batcher.batches_run for lane in lanes),
        }

    def describe(self) -> list[dict[str, Any]]:
        """One entry per lane (status pages)."""
        return [
            {
                "key": lane.key.describe(),
                "queued": lane.batcher.queued,
                "in_flight": lane.batcher.in_flight,
                "batches": lane.batcher.batches_run,
                "idle_s": round(time.monotonic() - lane.last_used, 3),
            }
            for lane in self.lanes.values()
        ]


async def collect(items: list[Item[P, R]], counters: Counter[str], counter: str) -> list[R]:
    """Every item's result, counting the request under ``counter`` (and ``<counter>_failed``).

    Whatever way this ends, the items still queued are cancelled: a failed or departed caller's
    inputs must not cost an upstream call.
    """
    counters[counter] += 1
    try:
        if len(items) == 1:
            # Most requests carry one text: awaiting its future is all that gather would do,
            # without gather's extra future and callbacks (this runs once per routed request).
            return [await items[0].future]
        return list(await asyncio.gather(*(item.future for item in items)))
    except BaseException:
        counters[f"{counter}_failed"] += 1
        raise
    finally:
        for item in items:
            item.future.cancel()  # no-op when done; drops the rest if we failed or left


def timings(items: Sequence[Item[Any, Any]], start: float) -> Timings:
    """A request's timings: its slowest item's queue and upstream time, and the total since
    ``start`` (a ``time.perf_counter()``)."""
    end = time.perf_counter()
    queue = inference = 0.0
    for i in items:
        queue = max(queue, i.started_at - i.enqueued_at)
        inference = max(inference, i.finished_at - i.started_at)
    return Timings(queue=queue * 1000, inference=inference * 1000, total=(end - start) * 1000)
