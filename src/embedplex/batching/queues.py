"""Ordering policies: which queued items form the next batch.

A queue is a replaceable part of the batcher (fair queuing per API key or priority lanes can
come in as new policies). The batcher owns the queue; nothing else touches it.
"""

from __future__ import annotations

from collections import deque
from typing import Any, Protocol

from embedplex.batching.item import Item

AnyItem = Item[Any, Any]


class BatchQueue(Protocol):
    def __len__(self) -> int: ...

    def push(self, item: AnyItem) -> None: ...

    def oldest_enqueued_at(self) -> float | None:
        """Enqueue time of the oldest waiting item (flush-on-wait is measured from it)."""

    def pop_expired(self, now: float) -> list[AnyItem]:
        """Remove and return items whose deadline has passed."""

    def next_deadline(self) -> float | None: ...

    def drop_gone(self) -> int:
        """Remove items whose caller has gone; return how many."""

    def cut(self, max_items: int, max_cost: int | None) -> list[AnyItem]:
        """Remove and return the next batch (never empty while the queue is not)."""


class FifoQueue:
    """Arrival order; the budget counts the sum of costs (for remote providers)."""

    def __init__(self) -> None:
        self._items: deque[AnyItem] = deque()

    def __len__(self) -> int:
        return len(self._items)

    def push(self, item: AnyItem) -> None:
        self._items.append(item)

    def oldest_enqueued_at(self) -> float | None:
        return self._items[0].enqueued_at if self._items else None

    def next_deadline(self) -> float | None:
        return min((i.deadline for i in self._items), default=None)

    def pop_expired(self, now: float) -> list[AnyItem]:
        expired = [i for i in self._items if i.deadline <= now]
        if expired:
            self._items = deque(i for i in self._items if i.deadline > now)
        return expired

    def drop_gone(self) -> int:
        before = len(self._items)
        self._items = deque(i for i in self._items if i.waiting)
        return before - len(self._items)

    def cut(self, max_items: int, max_cost: int | None) -> list[AnyItem]:
        batch: list[AnyItem] = []
        cost = 0
        while self._items and len(batch) < max_items:
            nxt = self._items[0]
            if batch and max_cost is not None and cost + nxt.cost > max_cost:
                break
            batch.append(self._items.popleft())
            cost += nxt.cost
        return batch


def padded_cost(costs: list[int]) -> int:
    """Tokens a batch occupies once padded to its longest member."""
    return max(costs) * len(costs) if costs else 0


class LengthBucketQueue:
    """Oldest item first, grown with the items closest to it in length (for local models).

    The budget is the padded size (longest item x count), as the backend sees it. The oldest item
    always goes into the next batch, so nothing starves; its companions are picked by length so
    that short texts do not pay for a long one's padding.
    """

    def __init__(self) -> None:
        self._items: list[AnyItem] = []

    def __len__(self) -> int:
        return len(self._items)

    def push(self, item: AnyItem) -> None:
        self._items.append(item)

    def oldest_enqueued_at(self) -> float | None:
        return self._items[0].enqueued_at if self._items else None

    def next_deadline(self) -> float | None:
        return min((i.deadline for i in self._items), default=None)

    def pop_expired(self, now: float) -> list[AnyItem]:
        expired = [i for i in self._items if i.deadline <= now]
        if expired:
            self._items = [i for i in self._items if i.deadline > now]
        return expired

    def drop_gone(self) -> int:
        before = len(self._items)
        self._items = [i for i in self._items if i.waiting]
        return before - len(self._items)

    def cut(self, max_items: int, max_cost: int | None) -> list[AnyItem]:
        items = self._items
        if not items:
            return []
        head = items[:max_items]
        if max_cost is None or max(i.cost for i in head) * len(head) <= max_cost:
            self._items = items[len(head) :]
            return head
        # Grow a window over the items sorted by cost, starting at the oldest one.
        order = sorted(range(len(items)), key=lambda k: items[k].cost)
        pos = order.index(0)
        lo = hi = pos
        anchor = items[0].cost
        top = anchor
        while hi - lo + 1 < max_items:
            size = hi - lo + 2
            below = items[order[lo - 1]].cost if lo > 0 else None
            above = items[order[hi + 1]].cost if hi + 1 < len(order) else None
            fits_below = below is not None and top * size <= max_cost
            fits_above = above is not None and above * size <= max_cost
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
        chosen = set(order[lo : hi + 1])
        batch = [items[k] for k in sorted(chosen)]
        self._items = [it for k, it in enumerate(items) if k not in chosen]
        return batch
