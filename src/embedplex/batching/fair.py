"""Fair queues: weighted fair order across API keys, and priority lanes with aging.

The plain queues (``queues.py``) serve in arrival order whoever sent the items, so one key that
queues a million chunks makes every other key wait behind them. These two serve keys in
weighted fair order instead (docs/scheduling.md), and cut exactly the plain queue's batches when
one key at one priority is waiting.

The rules, shared by both:

- Lanes. ``interactive`` items are served before ``batch`` items; a ``batch`` item that has
  waited ``aging`` seconds is served as ``interactive`` (so batch work always moves). The lane
  served is every interactive or aged item, or, when there is none, every item.
- Fair order inside the lane: each key has a virtual time, the work it was given divided by its
  weight (padded tokens for local models, the sum of costs for remote providers). The key (or
  keys) with the least virtual time lead the next batch; a key that starts waiting starts at the
  system's virtual clock (the leader's virtual time at the last cut) or where its last work
  ended, whichever is later: an idle key banks no credit, a new key leads the next batch, and a
  key that comes back at once (a client sending one request at a time) does not start afresh
  each time. That is start-time fair queuing with the batch as the packet; with weights it
  shares the model in their proportion.
- Length grouping (``FairLengthQueue``, local models): the leading keys' oldest item is grown
  with their items nearest it in length (``queues.group_by_length``, the plain queue's rule).
  Room left is filled with other items nearest in length (the other keys', then the other
  lane's) only with ``fill``: on a GPU, where a pass costs about the same whatever its rows, a
  light key's query then rides in a full batch for free; on a CPU a pass costs its padded
  tokens, so the query's batch is its own, a short pass, and the query waits for at most the
  one pass in flight, not for a full batch of someone else's texts as well.
- Nothing starves: every waiting key's virtual time is eventually the least (the others' grows
  each time they are served, across their idle gaps too), a key's oldest item leads its turn,
  and aging moves batch items into the lane that is served. Forgetting where a key's work ended
  once it had no item waiting let a few one-at-a-time clients, each back at the clock after
  every answer, keep the clock still and a backlogged key out for good (review: 137 of 200
  items of a bulk key timed out behind 6 such clients).
- The queue timeout bounds a request's wait without progress (``item.Progress``): each batch
  that takes one of its inputs renews the timeout of the others. A key's big request, served a
  share of the model at a time, does not time out while its key's turns keep coming; a request
  that gets no turn for the whole timeout still does (503), e.g. one queued behind its own
  key's earlier requests (a key's turn serves its oldest items first).

Per-key state lives while a key has items waiting, and where a key's last work ended only while
that is ahead of the clock (it is forgiven past ``_MAX_ENDED`` keys), so memory is bounded by
the queue and the keys served lately.
"""

from __future__ import annotations

import heapq
import time
from collections import Counter
from collections.abc import Callable, Mapping
from typing import Literal

from embedplex.batching.cost import TokenBudget
from embedplex.batching.queues import (
    AnyItem,
    BatchQueue,
    FifoQueue,
    LengthBucketQueue,
    SummedQueue,
    _ListQueue,
    group_by_length,
)
from embedplex.core.tenant import Priority

QueuePolicy = Literal["fair", "fifo"]
DEFAULT_AGING = 2.0  # seconds a batch-priority item waits before it is served as interactive

_BATCH = Priority.BATCH
# Keys whose last work ended ahead of the clock, remembered at most (past it, the oldest debts
# are forgiven: a key then restarts at the clock, as every key did before they were kept).
_MAX_ENDED = 65_536


class _FairState(_ListQueue):
    """Arrival order plus what the fair rules need: waiting counts and virtual times per key."""

    def __init__(self, *, aging: float = DEFAULT_AGING, clock: Callable[[], float] | None = None):
        super().__init__()
        if aging < 0:
            raise ValueError("aging must be >= 0 seconds")
        self.aging = aging
        self._now = clock or time.perf_counter  # the batcher stamps items with perf_counter
        self._count: Counter[str | None] = Counter()
        self._batch_items = 0  # items of the batch lane waiting
        self._vtime: dict[str | None, float] = {}
        self._weight: dict[str | None, int] = {}
        # Where the work of a key with nothing waiting ended, while that is ahead of the clock.
        self._ended: dict[str | None, float] = {}
        self._scan_at = 64  # ends remembered at which the next ``_forget_settled`` runs
        self._clock = 0.0  # the system's virtual clock

    def push(self, item: AnyItem) -> None:
        key = item.tenant_key
        count = self._count
        waiting = count.get(key, 0)
        if not waiting:
            ended = self._ended.pop(key, 0.0)
            self._vtime[key] = ended if ended > self._clock else self._clock
        count[key] = waiting + 1
        weight = item.weight
        self._weight[key] = weight if weight > 1 else 1
        if item.priority is _BATCH:
            self._batch_items += 1
        self._items.append(item)

    def _simple(self) -> bool:
        """One key at one priority waiting: the plain queue's batches are the fair ones."""
        return len(self._count) <= 1 and self._batch_items in (0, len(self._items))

    def _removed(self, items: list[AnyItem]) -> None:
        for item in items:
            key = item.tenant_key
            self._count[key] -= 1
            if not self._count[key]:
                del self._count[key], self._weight[key]
                # An idle key banks no credit (it restarts at the clock at least), but keeps
                # its debt: where its work ended, while that is ahead of the clock.
                ended = self._vtime.pop(key)
                if ended > self._clock:
                    self._ended[key] = ended
            if item.priority is _BATCH:
                self._batch_items -= 1
        if not self._items:  # all idle: every debt is behind a clock that starts again
            self._clock = 0.0
            self._ended.clear()
            self._scan_at = 64
        elif len(self._ended) > self._scan_at:
            self._forget_settled()

    def _forget_settled(self) -> None:
        """Drop the ends the clock has passed; past ``_MAX_ENDED`` forgive the oldest debts as
        well. Amortized: the next scan waits until as many ends again have been remembered (a
        scan that dropped nothing, new keys arriving while the clock stands, ran every cut)."""
        clock = self._clock
        ended = {key: end for key, end in self._ended.items() if end > clock}
        if len(ended) > _MAX_ENDED:
            ended = dict(sorted(ended.items(), key=lambda kv: kv[1])[-_MAX_ENDED // 2 :])
        self._ended = ended
        self._scan_at = max(2 * len(ended), 64)

    def by_key(self) -> tuple[Mapping[str | None, int], Mapping[str | None, int]] | None:
        return self._count, self._weight  # kept per push and removal: nothing to count

    def pop_expired(self, now: float) -> list[AnyItem]:
        expired = super().pop_expired(now)
        if expired:
            self._removed(expired)
        return expired

    def drop_gone(self) -> int:
        gone = [i for i in self._items if not i.waiting]
        if gone:
            self._items = [i for i in self._items if i.waiting]
            self._removed(gone)
        return len(gone)

    def _lane(self) -> list[int]:
        """Positions of the lane served now: interactive and aged items, else everything."""
        items = self._items
        if not self._batch_items:
            return list(range(len(items)))
        aged = self._now() - self.aging
        lane = [k for k, i in enumerate(items) if i.priority is not _BATCH or i.enqueued_at <= aged]
        return lane or list(range(len(items)))

    def _take(self, chosen: list[int]) -> list[AnyItem]:
        """Remove the items at ``chosen`` (ascending) and return them."""
        items = self._items
        picked = set(chosen)
        batch = [items[k] for k in chosen]
        self._items = [it for k, it in enumerate(items) if k not in picked]
        self._removed(batch)
        return batch

    def _charge(self, key: str | None, work: float) -> None:
        if key in self._vtime:  # gone once its last item was taken: nothing to charge
            self._vtime[key] += work / self._weight[key]

    def _charged(self, chosen: list[int], work: int) -> list[AnyItem]:
        """A batch of one key: charge it (so that a key arriving next leads) and take it."""
        key = self._items[chosen[0]].tenant_key
        self._clock = max(self._clock, self._vtime[key])
        self._charge(key, work)
        return self._take(chosen)


class FairLengthQueue(_FairState):
    """``LengthBucketQueue`` in weighted fair order across keys, with priority lanes.

    ``max_cost`` is the padded-token budget; a key is charged the padded tokens of its rows
    (the batch's longest x its rows), divided by its weight. ``fill``: whether room the
    leading keys leave is filled with others' items (see the module docstring).
    """

    def __init__(
        self,
        *,
        aging: float = DEFAULT_AGING,
        clock: Callable[[], float] | None = None,
        fill: bool = True,
    ) -> None:
        super().__init__(aging=aging, clock=clock)
        self.fill = fill

    def cut(self, max_items: int, max_cost: int | None) -> list[AnyItem]:
        items = self._items
        if not items:
            return []
        if self._simple():
            chosen = group_by_length([i.cost for i in items], max_items, max_cost)
            longest = max(items[k].cost for k in chosen)
            return self._charged(chosen, longest * len(chosen))
        lane = self._lane()
        vtime = self._vtime
        whole = len(lane) == len(items)
        keys = vtime.keys() if whole else {items[k].tenant_key for k in lane}
        least = min(vtime[key] for key in keys)
        lead = {key for key in keys if vtime[key] == least}
        leaders = [k for k in lane if items[k].tenant_key in lead]
        grouped = group_by_length([items[k].cost for k in leaders], max_items, max_cost)
        chosen = [leaders[j] for j in grouped]
        budget = TokenBudget(tokens=max_cost, items=max_items)
        if self.fill and _room(chosen, items, budget):
            in_lane = set(lane)
            for pool in (
                [k for k in lane if items[k].tenant_key not in lead],
                [] if whole else [k for k in range(len(items)) if k not in in_lane],
            ):
                _fill(chosen, pool, items, budget)
        chosen.sort()
        # Charged before they are taken: a key whose last item goes keeps where it ended.
        longest = max(items[k].cost for k in chosen)
        rows = Counter(items[k].tenant_key for k in chosen)
        for key, n in rows.items():
            self._charge(key, longest * n)
        self._clock = max(self._clock, least)
        return self._take(chosen)


def _room(chosen: list[int], items: list[AnyItem], budget: TokenBudget) -> bool:
    """Whether one more row as short as the batch's longest would still fit."""
    return budget.fits(max(items[k].cost for k in chosen), len(chosen) + 1)


def _fill(chosen: list[int], pool: list[int], items: list[AnyItem], budget: TokenBudget) -> None:
    """Add to ``chosen`` the items of ``pool`` nearest its first (oldest) in cost while they
    fit, as ``group_by_length`` grows a batch."""
    if not pool or not _room(chosen, items, budget):
        return
    anchor = items[chosen[0]].cost
    top = max(items[k].cost for k in chosen)
    for k in sorted(pool, key=lambda k: abs(items[k].cost - anchor)):
        cost = items[k].cost
        if budget.fits(max(top, cost), len(chosen) + 1):
            chosen.append(k)
            top = max(top, cost)
        elif cost <= top or len(chosen) >= budget.items:
            return  # no row fits any more: each would pad to at least ``top``


class FairFifoQueue(SummedQueue, _FairState):
    """``FifoQueue`` in weighted fair order across keys, with priority lanes (remote lanes).

    Items are taken one at a time from the key with the least virtual time (its oldest first),
    each charging its cost divided by the key's weight, until the batch is full or the next item
    passes ``max_cost`` (a sum of costs, as in ``FifoQueue``).
    """

    def cut(self, max_items: int, max_cost: int | None) -> list[AnyItem]:
        items = self._items
        if not items:
            return []
        if self._simple():
            chosen: list[int] = []
            _fifo_extend(chosen, 0, items, range(len(items)), max_items, max_cost)
            return self._charged(chosen, sum(items[k].cost for k in chosen))
        lane = self._lane()
        per_key: dict[str | None, list[int]] = {}
        for k in lane:
            per_key.setdefault(items[k].tenant_key, []).append(k)
        vtime = self._vtime
        heap = [(vtime[key], ks[0], key) for key, ks in per_key.items()]
        heapq.heapify(heap)
        self._clock = max(self._clock, heap[0][0])
        chosen = []
        cost = 0
        next_of = dict.fromkeys(per_key, 0)
        while heap and len(chosen) < max_items:
            key = heap[0][2]
            k = per_key[key][next_of[key]]
            if chosen and max_cost is not None and cost + items[k].cost > max_cost:
                break
            chosen.append(k)
            cost += items[k].cost
            self._charge(key, items[k].cost)
            next_of[key] += 1
            if next_of[key] < len(per_key[key]):
                heapq.heapreplace(heap, (vtime[key], per_key[key][next_of[key]], key))
            else:
                heapq.heappop(heap)
        if not heap and len(chosen) < max_items:  # the lane is all in: fill from the other
            in_lane = set(lane)
            others = [k for k in range(len(items)) if k not in in_lane]
            start = len(chosen)
            _fifo_extend(chosen, cost, items, others, max_items, max_cost)
            for k in chosen[start:]:
                self._charge(items[k].tenant_key, items[k].cost)
        chosen.sort()
        return self._take(chosen)

    def _take(self, chosen: list[int]) -> list[AnyItem]:
        batch = super()._take(chosen)
        self._held -= sum(i.cost for i in batch)
        return batch


def _fifo_extend(
    chosen: list[int],
    cost: int,
    items: list[AnyItem],
    positions: range | list[int],
    max_items: int,
    max_cost: int | None,
) -> None:
    """``FifoQueue``'s rule: append ``positions`` in order while they fit beside ``chosen``."""
    for k in positions:
        if len(chosen) >= max_items:
            return
        c = items[k].cost
        if chosen and max_cost is not None and cost + c > max_cost:
            return
        chosen.append(k)
        cost += c


def make_queue(
    policy: QueuePolicy, *, lengths: bool, aging: float = DEFAULT_AGING, fill: bool = True
) -> BatchQueue:
    """The queue of one batcher: ``lengths`` for local models (padded budget), else remote.

    ``fifo``: the plain queues (arrival order, whoever sent the items); ``fair``: their fair
    twins above (``fill``: ``FairLengthQueue``'s).
    """
    if policy == "fifo":
        return LengthBucketQueue() if lengths else FifoQueue()
    if policy == "fair":
        if lengths:
            return FairLengthQueue(aging=aging, fill=fill)
        return FairFifoQueue(aging=aging)
    raise ValueError(f"unknown queue policy {policy!r} (fair or fifo)")
