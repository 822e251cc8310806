"""``bench fairness`` against a real in-process server with the fake backend: the counting.

No timing assertions (the figures are docs/scheduling.md's): the queries and bulk requests are
answered under their own keys, counted apart, and reported side by side.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import pytest

from embedplex.backends.fake import FakeBackend
from embedplex.bench.fairness import FairnessOptions, Side, fairness_report, keys_env, run_side
from embedplex.bench.stats import LoadResult, Outcomes
from embedplex.bench.workload import TokenSpec

ServerFactory = Callable[..., Any]


async def test_a_side_counts_the_interactive_and_the_bulk_key_apart(
    server: ServerFactory,
) -> None:
    env, bulk_key, search_key = keys_env()
    keys = json.loads(env["EMBEDPLEX_API_KEYS"])
    assert [(k["id"], k["priority"]) for k in keys] == [
        ("bulk", "batch"),
        ("search", "interactive"),
    ]
    options = FairnessOptions(
        duration=1.5,
        warmup=0.2,
        bulk_concurrency=2,
        bulk_inputs=4,
        bulk_tokens=TokenSpec(5, 20),
        query_rate=20,
    )
    async with server(FakeBackend(dim=384, delay=0.002), api_keys=keys) as url:
        side = await run_side(url, options, bulk_key, search_key)
        wrong = await run_side(url, options, bulk_key, "not-a-key-at-all")
    search, bulk = side.search, side.bulk
    assert search.fail == 0 and bulk.fail == 0
    assert 15 <= search.ok <= 31  # one query every 50 ms for 1.5 s, open loop
    assert search.inputs_per_request == 1 and bulk.inputs_per_request == 4
    assert bulk.ok > 0 and abs(bulk.inputs_per_s - bulk.ok * 4 / bulk.elapsed_s) < 1e-6
    assert wrong.search.ok == 0 and wrong.search.other_status == {"401": wrong.search.fail}
    sides = [Side("fair", search, bulk), Side("fifo", search, bulk)]
    report = fairness_report(sides, options)
    rows = [line.split("|")[1].strip() for line in report.splitlines() if line.startswith("| ")]
    assert rows[-2:] == ["fair", "fifo"]
    assert "fair / fifo: 1.00x" in report


async def test_every_text_a_side_sends_is_new(recording: Any) -> None:
    """Bulk and query texts alike are sent once, warm-up included: neither a cache nor
    in-flight dedupe can answer a key (the recording server answers at once, so the bulk
    key sends hundreds of requests)."""
    options = FairnessOptions(
        duration=0.6, warmup=0.2, bulk_concurrency=2, bulk_inputs=4, query_rate=20
    )
    with recording() as srv:
        side = await run_side(srv.url, options, "bulk-key", "search-key")
        sent = list(srv.texts)
    assert side.bulk.ok > 64  # more than the 64 bodies the bulk key used to cycle
    assert len(sent) > 4 * 64
    assert len(set(sent)) == len(sent)


def test_both_servers_run_with_the_cache_off(
    monkeypatch: pytest.MonkeyPatch, fake_process: Any
) -> None:
    from embedplex.bench import fairness

    async def side(url: str, options: FairnessOptions, bulk: str, search: str) -> Side:
        return Side("", _result(), _result())

    monkeypatch.setattr(fairness, "ServerProcess", fake_process)
    monkeypatch.setattr(fairness, "run_side", side)
    sides = fairness.run_fairness(FairnessOptions(server_args=("--model-id", "m")))
    assert [s.policy for s in sides] == ["fair", "fifo"]
    for (args, _), policy in zip(fake_process.started, ("fair", "fifo"), strict=True):
        # the cache off, before the caller's own flags (which may turn it back on)
        assert args == ["--queue-policy", policy, "--cache-max-bytes", "0", "--model-id", "m"]


def _result() -> LoadResult:
    return LoadResult.summarize(
        Outcomes(),
        setup="x",
        url="http://127.0.0.1:9",
        dialect="openai",
        tokens="14",
        concurrency=1,
        inputs_per_request=1,
        elapsed_s=1.0,
    )
