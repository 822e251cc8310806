"""The same-text-at-once workload: what each round sends, and a run against real servers."""

from __future__ import annotations

import asyncio
import json
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from embedplex.backends.fake import FakeBackend
from embedplex.bench.dedupe import DedupeOptions, RoundBodies, run_dedupe
from embedplex.cli.main import app

URL = "http://127.0.0.1:9"


def test_a_round_is_one_new_text_for_every_caller() -> None:
    rounds = RoundBodies(DedupeOptions(url=URL, callers=5, rounds=1))
    seen: set[bytes] = set()
    for _ in range(50):
        bodies = rounds()
        assert len(bodies) == 5
        assert len(set(bodies)) == 1
        assert bodies[0] not in seen
        seen.add(bodies[0])


def test_the_baseline_round_is_a_new_text_per_caller() -> None:
    rounds = RoundBodies(DedupeOptions(url=URL, callers=5, rounds=1, same_text=False))
    sent = [b for _ in range(50) for b in rounds()]
    assert len(set(sent)) == len(sent) == 250


def test_options_are_checked() -> None:
    with pytest.raises(ValueError, match="rounds or --duration"):
        DedupeOptions(url=URL)
    with pytest.raises(ValueError, match="callers"):
        DedupeOptions(url=URL, rounds=1, callers=0)
    with pytest.raises(ValueError, match="url"):
        DedupeOptions(url="https://x", rounds=1)


async def test_every_caller_of_a_round_sends_the_rounds_text(recording: Any) -> None:
    with recording() as srv:
        result = await run_dedupe(DedupeOptions(url=srv.url, callers=16, rounds=6))
        sent = Counter(srv.texts)
    assert (result.requests, result.ok, result.concurrency) == (96, 96, 16)
    assert result.setup == "same text x16"
    assert sorted(sent.values()) == [16] * 8  # two warm-up rounds and six measured


async def test_against_the_fake_backend_every_caller_is_answered(server: Any) -> None:
    async with server(FakeBackend(dim=8)) as url:
        result = await run_dedupe(
            DedupeOptions(url=url, callers=8, rounds=3, same_text=False, warmup_rounds=0)
        )
    assert (result.ok, result.fail) == (24, 0)
    assert result.setup == "distinct texts x8"


async def test_cli_prints_the_servers_counters(recording: Any, tmp_path: Path) -> None:
    target = tmp_path / "d.json"
    with recording() as srv:
        args = ["bench", "dedupe", "--url", srv.url, "--callers", "4", "--rounds", "3"]
        out = await asyncio.to_thread(CliRunner().invoke, app, [*args, "--json", str(target)])
    assert out.exit_code == 0, out.output
    assert "server counters: embedplex_cache_hits_total +9" in out.output  # 3 of 4 a round
    data = json.loads(target.read_text())
    assert data["ok"] == 12
    assert data["counters"]["embedplex_cache_misses_total"] == 3


def test_cli_rejects_bad_options() -> None:
    out = CliRunner().invoke(app, ["bench", "dedupe", "--callers", "0", "--rounds", "1"])
    assert out.exit_code != 0
    assert "callers" in out.output
