"""The lane machinery embed and rerank share: ``guard.UpstreamGuard`` and ``lanes.LaneSet``.

Driven directly, without HTTP: a send function stands in for the upstream call.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from typing import Any

import pytest

from embedplex.core.errors import UnavailableError, UpstreamError, UpstreamRefusedError
from embedplex.providers.base import EmbedParams
from embedplex.providers.config import ProviderConfig
from embedplex.providers.guard import UpstreamGuard, token_shares
from embedplex.providers.health import ProviderHealth
from embedplex.providers.http import Attempt, Outcome
from embedplex.providers.lanes import LaneSet, collect


def make_guard(max_concurrency: int = 4) -> UpstreamGuard:
    return UpstreamGuard(
        "p", ProviderHealth(failures_to_open=1), asyncio.Semaphore(max_concurrency), Counter()
    )


async def test_a_413_splits_until_each_input_fails_alone() -> None:
    guard = make_guard()
    calls: list[list[str]] = []

    async def send(part: list[str]) -> list[str]:
        calls.append(part)
        if len(part) > 1 or part == ["big"]:
            raise UpstreamError("too large", status=413)
        return [s.upper() for s in part]

    assert await guard.call(["a", "b", "c"], send) == ["A", "B", "C"]
    assert guard.counters["splits"] == 2  # [a b c] -> [a] [b c] -> [b] [c]
    # One input cannot be split further: too large for the upstream, its caller's 422.
    with pytest.raises(UpstreamRefusedError, match="too large") as refused:
        await guard.call(["big"], send)
    assert refused.value.param == "input"


async def test_other_errors_are_not_split() -> None:
    guard = make_guard()

    async def send(part: list[str]) -> list[str]:
        raise UpstreamError("bad gateway", status=502)

    with pytest.raises(UpstreamError):
        await guard.call(["a", "b"], send)
    assert guard.counters["splits"] == 0


async def test_an_open_circuit_refuses_before_the_call() -> None:
    guard = make_guard()
    guard.health.record(
        Attempt(started=0, latency=0.1, outcome=Outcome.SERVER_ERROR, status=500, size=1)
    )

    async def send(part: list[str]) -> list[str]:
        raise AssertionError("must not be called")

    with pytest.raises(UnavailableError, match="circuit is open"):
        await guard.call(["a"], send)


async def test_the_semaphore_bounds_concurrent_calls() -> None:
    guard = make_guard(max_concurrency=1)
    running = 0
    most = 0

    async def send(part: list[str]) -> list[str]:
        nonlocal running, most
        running += 1
        most = max(most, running)
        await asyncio.sleep(0.01)
        running -= 1
        return part

    await asyncio.gather(*(guard.call([str(i)], send) for i in range(4)))
    assert most == 1


def test_token_shares_split_the_bill_by_length() -> None:
    assert token_shares(30, ["a", "bb"]) == [10.0, 20.0]
    assert token_shares(None, ["a"]) == [0.0]
    assert token_shares(5, [""]) == [0.0]


async def test_lanes_are_made_per_key_named_counted_and_swept() -> None:
    counters: Counter[str] = Counter()

    async def run(batch: list[str], key: EmbedParams) -> list[Any]:
        return [(s, key.dimensions) for s in batch]

    config = ProviderConfig(name="p", type="tei", endpoint="http://127.0.0.1:1", max_wait_ms=0)
    lanes: LaneSet[EmbedParams, str, Any] = LaneSet(
        config, run, counters, tag="rerank", created="rerank_lanes_created"
    )
    small = await lanes.lane(EmbedParams(dimensions=8), ceiling=4, size=2)
    assert await lanes.lane(EmbedParams(dimensions=8), ceiling=4) is small
    other = await lanes.lane(EmbedParams(dimensions=16), ceiling=4)
    assert small.batcher.name == "p#rerank0" and other.batcher.name == "p#rerank1"
    assert counters["rerank_lanes_created"] == 2

    items = small.batcher.submit(["x", "y"], [1, 1])
    assert await collect(items, counters, "rerank_requests") == [("x", 8), ("y", 8)]
    assert counters["rerank_requests"] == 1 and counters["rerank_requests_failed"] == 0
    assert lanes.totals()["batches"] == 1
    assert [d["key"]["dimensions"] for d in lanes.describe()] == [8, 16]

    assert await lanes.sweep(0) == 2
    assert lanes.lanes == {}
    await lanes.close()
