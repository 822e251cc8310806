"""``bench load`` reads the server's cache counters around the run and says when a workload
meant to miss was answered by the cache; its seed is new each run unless given, and shown."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

from typer.testing import CliRunner

from embedplex.bench import metrics
from embedplex.bench.checks import cache_warning
from embedplex.cli.main import app

WARNING = "warning: the server's cache answered"


async def _load(url: str, target: Path, *args: str) -> tuple[Any, dict[str, Any]]:
    cmd = ["bench", "load", "--url", url, "--concurrency", "4", *args, "--json", str(target)]
    out = await asyncio.to_thread(CliRunner().invoke, app, cmd)
    assert out.exit_code == 0, out.output
    return out, json.loads(await asyncio.to_thread(target.read_text))


async def test_the_cycled_bodies_answered_by_a_cache_are_flagged(
    recording: Any, tmp_path: Path
) -> None:
    """The classic workload: 512 bodies, cycled; the recording server plays a perfect cache."""
    with recording() as srv:
        out, data = await _load(srv.url, tmp_path / "r.json", "--requests", "600")
    hits = data["counters"][metrics.HITS]
    assert hits > 0 and hits + data["counters"][metrics.MISSES] == 600
    assert data["counters"][metrics.MISSES] <= 512
    assert WARNING in out.output and "--repeat 0" in out.output
    assert f"server counters: embedplex_cache_hits_total +{hits:,.0f}" in out.output


async def test_a_seed_sent_twice_is_flagged_the_second_time(recording: Any, tmp_path: Path) -> None:
    with recording() as srv:
        args = ("--requests", "100", "--repeat", "0", "--seed", "7")
        first, one = await _load(srv.url, tmp_path / "1.json", *args)
        second, two = await _load(srv.url, tmp_path / "2.json", *args)
    assert (one["seed"], one["counters"][metrics.HITS]) == (7, 0)
    assert WARNING not in first.output
    assert (two["seed"], two["counters"][metrics.HITS]) == (7, 100)
    assert WARNING in second.output and "--seed" in second.output


async def test_without_a_seed_each_run_draws_a_new_one_and_shows_it(
    recording: Any, tmp_path: Path
) -> None:
    with recording() as srv:
        args = ("--requests", "100", "--repeat", "0")
        first, one = await _load(srv.url, tmp_path / "1.json", *args)
        second, two = await _load(srv.url, tmp_path / "2.json", *args)
        sent = list(srv.texts)
    assert one["seed"] != two["seed"]
    assert f"seed {one['seed']} (--seed {one['seed']} sends these texts again)" in first.output
    assert f"seed {two['seed']}" in second.output
    assert len(set(sent)) == len(sent) == 200  # the second run's texts are new as well
    assert two["counters"][metrics.HITS] == 0
    assert WARNING not in first.output + second.output


async def test_a_server_without_metrics_reads_as_no_counters(
    recording: Any, tmp_path: Path
) -> None:
    with recording(metrics=False) as srv:
        out, data = await _load(srv.url, tmp_path / "r.json", "--requests", "600")
    assert data["counters"] == {}
    assert "server counters" not in out.output and WARNING not in out.output


def test_repeats_are_expected_where_the_workload_asks_for_them() -> None:
    hits = {metrics.HITS: 5.0}
    assert cache_warning(0.3, hits) == ""
    assert cache_warning(0.0, {metrics.HITS: 0.0}) == ""
    assert cache_warning(None, {}) == ""
    assert "5 inputs" in cache_warning(0.0, hits)
    assert "5 inputs" in cache_warning(None, hits)
