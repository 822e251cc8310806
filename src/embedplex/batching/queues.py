"""Ordering policies: which queued items form the next batch.

A queue is a replaceable part of the batcher; the batcher owns it, nothing else touches it.
These two serve in arrival order whoever sent the items; ``batching/fair.py`` holds their fair
twins (weighted fair order across API keys, priority lanes), which cut the same batches when
one key at one priority is waiting (docs/scheduling.md).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Protocol

from embedplex.batching.cost import TokenBudget
from embedplex.batching.item import Item

AnyItem = Item[Any, Any]


class BatchQueue(Protocol):
    def __len__(self) -> int: ...

    def push(self, item: AnyItem) -> None: ...

    def oldest_enqueued_at(self) -> float | None:
        """Enqueue time of the oldest waiting item (flush-on-wait is measured from it)."""

    def pop_expired(self, now: float) -> list[AnyItem]:
        """Remove and return items whose deadline has passed (``Item.expires_at``)."""

    def next_deadline(self) -> float | None: ...

    def drop_gone(self) -> int:
        """Remove items whose caller has gone; return how many."""

    def cut(self, max_items: int, max_cost: int | None) -> list[AnyItem]:
        """Remove and return the next batch (never empty while the queue is not).

        Each policy says what ``max_cost`` bounds: padded tokens (``LengthBucketQueue``) or a
        sum of costs (``FifoQueue``).
        """

    def by_key(self) -> tuple[Mapping[str | None, int], Mapping[str | None, int]] | None:
        """Items waiting per key, and each such key's weight (``admission.py``: read only
        once the queue is past its share threshold); None for a queue that serves in arrival
        order, whoever sent it, where no key's share is kept (and counting them would cost a
        pass over the whole queue for every request under overload)."""

    def held_cost(self) -> int | None:
        """The sum of the waiting items' costs, where ``max_cost`` bounds that sum (the remote
        lanes' queues keep it as items come and go); None where it bounds something else (a
        local model's padded tokens), whose batches never wait to fill."""


class _ListQueue:
    """Items in arrival order; the bookkeeping every policy shares."""

    def __init__(self) -> None:
        self._items: list[AnyItem] = []

    def __len__(self) -> int:
        return len(self._items)

    def push(self, item: AnyItem) -> None:
        self._items.append(item)

    def oldest_enqueued_at(self) -> float | None:
        return self._items[0].enqueued_at if self._items else None

    def next_deadline(self) -> float | None:
        # ``Item.deadline``, which may be earlier than the item's real end (its request's
        # clock moved on since): the batcher then wakes early, and ``pop_expired`` renews it.
        return min((i.deadline for i in self._items), default=None)

    def pop_expired(self, now: float) -> list[AnyItem]:
        # The plain attribute first (each cut reads every item): only an item past its own
        # deadline asks its request's clock (``Item.expires_at``), and keeps what it says.
        due = [i for i in self._items if i.deadline <= now]
        if not due:
            return due
        expired = []
        for item in due:
            item.deadline = item.expires_at
            if item.deadline <= now:
                expired.append(item)
        if expired:
            self._items = [i for i in self._items if i.deadline > now]
        return expired

    def drop_gone(self) -> int:
        before = len(self._items)
        self._items = [i for i in self._items if i.waiting]
        return before - len(self._items)

    def by_key(self) -> tuple[Mapping[str | None, int], Mapping[str | None, int]] | None:
        return None  # arrival order: the fair queues (fair.py) keep per-key counts

    def held_cost(self) -> int | None:
        return None  # local models' queues: their budget is padded tokens, not a sum


class SummedQueue(_ListQueue):
    """The remote lanes' bookkeeping: the sum of the waiting items' costs (``held_cost``), so
    that a batch full by its budget flushes at once, as one full by count does (the batcher
    asks it each time it would wait; a pass over the queue then would cost one per arrival).
    Removals recount it: each is a pass over the queue already. Local models' queues do not
    keep it: their pushes are the benchmarked path, and their batches never wait to fill."""

    def __init__(self, **options: Any) -> None:  # options: a fair twin's (``fair.py``)
        super().__init__(**options)
        self._held = 0

    def push(self, item: AnyItem) -> None:
        super().push(item)
        self._held += item.cost

    def held_cost(self) -> int | None:
        return self._held

    def _recount(self) -> None:
        self._held = sum(i.cost for i in self._items)

    def pop_expired(self, now: float) -> list[AnyItem]:
        expired = super().pop_expired(now)
        if expired:
            self._recount()
        return expired

    def drop_gone(self) -> int:
        gone = super().drop_gone()
        if gone:
            self._recount()
        return gone


class FifoQueue(SummedQueue):
    """Arrival order, for remote providers: ``max_cost`` bounds the sum of the items' costs.

    A remote request is priced per input (or per token) and nothing is padded, so its cost is a
    plain sum; local models' padded budget is ``cost.TokenBudget`` (``LengthBucketQueue``).
    """

    def cut(self, max_items: int, max_cost: int | None) -> list[AnyItem]:
        taken = 0
        cost = 0
        for item in self._items[:max_items]:
            if taken and max_cost is not None and cost + item.cost > max_cost:
                break
            taken += 1
            cost += item.cost
        batch = self._items[:taken]
        self._items = self._items[taken:]
        self._held -= cost
        return batch


class LengthBucketQueue(_ListQueue):
    """Oldest item first, grown with the items closest to it in length (for local models).

    ``max_cost`` is the model's padded-token budget (``cost.TokenBudget``: longest item x count,
    as the backend sees it). The oldest item always goes into the next batch, so nothing starves;
    its companions are picked by length so that short texts do not pay for a long one's padding.
    """

    def cut(self, max_items: int, max_cost: int | None) -> list[AnyItem]:
        items = self._items
        if not items:
            return []
        chosen = group_by_length([i.cost for i in items], max_items, max_cost)
        if len(chosen) == len(items):
            self._items = []
            return items
        picked = set(chosen)
        self._items = [it for k, it in enumerate(items) if k not in picked]
        return [items[k] for k in chosen]


def group_by_length(costs: list[int], max_items: int, max_cost: int | None) -> list[int]:
    """Positions (ascending) of the next batch among ``costs``, given oldest first.

    The first (oldest) always goes; it is grown with the costs nearest its own while the batch
    fits ``TokenBudget(max_cost, max_items)``. ``LengthBucketQueue`` cuts with it over everything
    waiting; the fair queue (``batching/fair.py``) over the keys whose turn it is.
    """
    if not costs:
        return []
    budget = TokenBudget(tokens=max_cost, items=max_items)
    head = min(max_items, len(costs))
    if budget.fits(max(costs[:head]), head):
        return list(range(head))
    # Grow a window over the costs sorted, starting at the oldest one.
    order = sorted(range(len(costs)), key=costs.__getitem__)
    pos = order.index(0)
    lo = hi = pos
    anchor = costs[0]
    top = anchor
    while hi - lo + 1 < max_items:
        size = hi - lo + 2
        below = costs[order[lo - 1]] if lo > 0 else None
        above = costs[order[hi + 1]] if hi + 1 < len(order) else None
        fits_below = below is not None and budget.fits(top, size)
        fits_above = above is not None and budget.fits(above, size)
        if (
            below is not None
            and fits_below
            and (above is None or not fits_above or anchor - below <= above - anchor)
        ):
            lo -= 1
        elif above is not None and fits_above:
            hi += 1
            top = above
        else:
            break
    return sorted(order[lo : hi + 1])
