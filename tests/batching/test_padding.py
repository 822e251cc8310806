"""Length bucketing: a local batch never pads more than PADDING_SLACK x its real tokens."""

from __future__ import annotations

import asyncio
import random

from embedplex.batching import Item, LengthBucketQueue
from embedplex.batching.queues import PADDING_SLACK


def _queue(costs: list[int]) -> LengthBucketQueue:
    loop = asyncio.new_event_loop()
    q = LengthBucketQueue()
    for k, cost in enumerate(costs):
        q.push(Item(k, cost, loop.create_future(), float(k), 1e9))
    loop.close()
    return q


def test_equal_lengths_take_the_whole_head() -> None:
    q = _queue([14] * 200)
    assert [i.payload for i in q.cut(128, 16384)] == list(range(128))


def test_mixed_lengths_are_cut_into_similar_lengths() -> None:
    rng = random.Random(0)
    q = _queue([rng.randint(5, 256) for _ in range(64)])
    waiting = set(range(64))
    while len(q):
        batch = q.cut(128, 16384)
        costs = [i.cost for i in batch]
        assert min(waiting) in [i.payload for i in batch]  # the oldest always goes: no starvation
        assert max(costs) * len(costs) <= PADDING_SLACK * sum(costs)
        waiting -= {i.payload for i in batch}
    assert not waiting


def test_far_apart_lengths_go_alone() -> None:
    q = _queue([5, 256, 5, 256])
    assert [i.payload for i in q.cut(128, 16384)] == [0, 2]
    assert [i.payload for i in q.cut(128, 16384)] == [1, 3]
