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


# A local batch may hold at most this many padded tokens per real token: a 5-token text does
# not ride in a batch padded to 256 (measured on mixed 5-256 lengths: see docs/benchmarks.md).
PADDING_SLACK = 1.5


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
        costs = [i.cost for i in head]
        padded = max(costs) * len(head)
        if (max_cost is None or padded <= max_cost) and padded <= PADDING_SLACK * sum(costs):
            self._items = items[len(head) :]
            return head
        # Grow a window over the items sorted by cost, starting at the oldest one, while the
        # batch fits the budget and padding stays within PADDING_SLACK of the real tokens.
        budget = max_cost if max_cost is not None else 1 << 62
        order = sorted(range(len(items)), key=lambda k: items[k].cost)
        pos = order.index(0)
        lo = hi = pos
        anchor = items[0].cost
        top = total = anchor
        while hi - lo + 1 < max_items:
            size = hi - lo + 2
            below = items[order[lo - 1]].cost if lo > 0 else None
            above = items[order[hi + 1]].cost if hi + 1 < len(order) else None
            fits_below = (
                below is not None
                and top * size <= budget
                and top * size <= PADDING_SLACK * (total + below)
            )
            fits_above = (
                above is not None
                and above * size <= budget
                and above * size <= PADDING_SLACK * (total + above)
            )
            if (
                below is not None
                and fits_below
                and (above is None or not fits_above or anchor - below <= above - anchor)
            ):
                lo -= 1
                total += below
            elif above is not None and fits_above:
                hi += 1
                top = above
                total += above
            else:
                break
        chosen = set(order[lo : hi + 1])
        batch = [items[k] for k in sorted(chosen)]
        self._items = [it for k, it in enumerate(items) if k not in chosen]
        return batch
