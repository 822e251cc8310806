"""Ordering policies: which queued items form the next batch."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import pytest

from embedplex.batching import Item, LengthBucketQueue, padded_cost


@pytest.fixture
def loop() -> Iterator[asyncio.AbstractEventLoop]:
    loop = asyncio.new_event_loop()
    yield loop
    loop.close()


def fill(loop: asyncio.AbstractEventLoop, costs: list[int]) -> LengthBucketQueue:
    q = LengthBucketQueue()
    for i, cost in enumerate(costs):
        q.push(Item(f"p{i}", cost, loop.create_future(), float(i), 100.0 + i))
    return q


def test_everything_that_fits_goes_in_arrival_order(loop: asyncio.AbstractEventLoop) -> None:
    q = fill(loop, [3, 5, 4])
    assert [i.payload for i in q.cut(10, 100)] == ["p0", "p1", "p2"]
    assert len(q) == 0


def test_similar_lengths_go_together_and_the_oldest_always_goes(
    loop: asyncio.AbstractEventLoop,
) -> None:
    q = fill(loop, [10, 200, 12, 190, 11, 205])
    first = q.cut(64, 400)
    assert [i.payload for i in first] == ["p0", "p2", "p4"]  # the short ones, with the oldest
    second = q.cut(64, 400)
    assert {i.payload for i in second} == {"p1", "p3"}  # 2 x 205 would not fit beside them
    assert padded_cost([i.cost for i in second]) <= 400
    assert [i.payload for i in q.cut(64, 400)] == ["p5"]


def test_max_items_caps_the_batch(loop: asyncio.AbstractEventLoop) -> None:
    q = fill(loop, [5] * 10)
    assert len(q.cut(4, 1000)) == 4
    assert len(q) == 6


def test_budget_smaller_than_one_input_still_makes_progress(
    loop: asyncio.AbstractEventLoop,
) -> None:
    q = fill(loop, [50, 60])
    assert [i.payload for i in q.cut(8, 10)] == ["p0"]


def test_expired_and_gone_items_leave_the_queue(loop: asyncio.AbstractEventLoop) -> None:
    q = fill(loop, [1, 1, 1])
    assert q.next_deadline() == 100.0
    assert [i.payload for i in q.pop_expired(100.5)] == ["p0"]
    q.push(Item("late", 1, loop.create_future(), 5.0, 200.0))
    gone = q.cut(1, None)[0]
    assert gone.payload == "p1"
    q.push(gone)
    gone.future.cancel()
    assert q.drop_gone() == 1
    assert [i.payload for i in q.cut(10, None)] == ["p2", "late"]
