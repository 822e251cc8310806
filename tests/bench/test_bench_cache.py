"""``bench cache``: the plan of runs, a whole run against recording servers, and the report."""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from embedplex.bench import cache as cache_bench
from embedplex.bench import metrics
from embedplex.bench.cache import (
    CacheBenchOptions,
    CacheData,
    CacheRun,
    cache_section,
    cells,
    dedupe_rows,
    repeat_rows,
    run_cache_bench,
)
from embedplex.bench.report import SuiteData, write_report
from embedplex.bench.stats import LoadResult, Outcomes
from embedplex.cli.main import app


def test_the_first_side_alternates_and_every_cell_has_its_own_seed() -> None:
    options = CacheBenchOptions(rounds=2)
    plan = [cell for r in (1, 2) for cell in cells(options, r)]
    assert [share for share, _, _ in plan] == [0.0, 0.3, 0.9] * 2
    assert [order[0] for _, _, order in plan] == ["off", "on"] * 3
    for share in options.shares:  # each share runs once with each side first
        assert {order for s, _, order in plan if s == share} == {("off", "on"), ("on", "off")}
    assert len({seed for _, seed, _ in plan}) == 6


def test_the_two_servers_differ_only_in_the_cache() -> None:
    options = CacheBenchOptions(cache_bytes=1000, server_args=("--dtype", "int8"))
    assert options.side_args("off") == ["--cache-max-bytes", "0", "--dtype", "int8"]
    assert options.side_args("on") == ["--cache-max-bytes", "1000", "--dtype", "int8"]


@pytest.mark.parametrize(
    "bad", [{"shares": (0.3, 1.2)}, {"shares": ()}, {"rounds": 0}, {"cache_bytes": 0}]
)
def test_options_are_checked(bad: dict[str, Any]) -> None:
    with pytest.raises(ValueError, match=r"share|round|cache"):
        CacheBenchOptions(**bad)


@pytest.mark.slow
def test_a_whole_run_against_recording_servers(recording: Any, tmp_path: Path) -> None:
    """No fresh text reaches a server twice in the whole run (cells, rounds, warm-ups, dedupe
    alike), hot texts do, and the counters cover the measured part of each run only."""
    started: list[tuple[list[str], Any]] = []

    @contextmanager
    def launch(args: list[str], log: Path) -> Iterator[Any]:
        with recording() as srv:
            started.append((args, srv))
            yield srv

    options = CacheBenchOptions(
        duration=0.3,
        concurrency=4,
        shares=(0.0, 0.5),
        hot_set=8,
        rounds=2,
        callers=4,
        log_dir=tmp_path,
    )
    d = run_cache_bench(options, launch=launch)
    assert [args for args, _ in started] == [options.side_args("off"), options.side_args("on")]
    assert len(d.runs) == 2 * (2 * 2 + 4)
    assert all(r.result.ok > 0 and r.result.fail == 0 for r in d.runs)
    for run in d.runs:
        if run.workload == "repeat" and run.repeat == 0.0:
            assert run.counters[metrics.HITS] == 0, run
            assert run.counters[metrics.MISSES] == run.result.ok
        if run.workload == "repeat" and run.repeat == 0.5:
            assert run.counters[metrics.HITS] > 0
        if run.workload == "same":  # every caller but one of each round repeats its text
            assert run.counters[metrics.HITS] == run.result.ok * 3 / 4
        if run.workload == "distinct":
            assert run.counters[metrics.HITS] == 0
    # each run's warm-up is left out of its counters
    assert all(sum(r.counters.values()) == r.result.ok for r in d.runs if r.workload != "same")
    assert "| 50%" in cache_section(d)


def _result(inputs_per_s: float, p50: float = 10.0) -> LoadResult:
    out = Outcomes()
    for _ in range(int(inputs_per_s)):
        out.record(200, p50 / 1000)
    return LoadResult.summarize(
        out,
        setup="x",
        url="http://127.0.0.1:1",
        dialect="openai",
        tokens="14",
        concurrency=64,
        inputs_per_request=1,
        elapsed_s=1.0,
    )


def _canned() -> CacheData:
    def run(
        cache: str, workload: str, share: float | None, r: int, rate: float, **c: float
    ) -> CacheRun:
        counters = {getattr(metrics, k.upper()): v for k, v in c.items()}
        return CacheRun(
            cache=cache,
            workload=workload,
            repeat=share,
            round=r,
            result=_result(rate),
            counters=counters,
        )

    runs = [
        run("off", "repeat", 0.3, 1, 400, hits=0, misses=0, joined=5),
        run("on", "repeat", 0.3, 1, 560, hits=290, misses=710, joined=1),
        run("on", "repeat", 0.3, 2, 600, hits=310, misses=690, joined=2),
        run("off", "repeat", 0.3, 2, 420, hits=0, misses=0, joined=4),
        run("off", "repeat", 0.9, 1, 410),
        run("on", "repeat", 0.9, 1, 4000),
        run("off", "same", None, 1, 3000, joined=2520),
        run("off", "distinct", None, 1, 500, joined=0),
    ]
    return CacheData(
        runs=runs,
        commands=["embedplex serve --cache-max-bytes 0"],
        concurrency=64,
        callers=64,
        hot_set=256,
        cache_bytes=1 << 26,
        tokens="14",
        duration=15.0,
    )


def test_the_tables_render_from_canned_runs() -> None:
    d = _canned()
    assert repeat_rows(d) == [
        ["30%", "410.0", "580.0", "1.41 x", "10.0", "10.0", "30%", "9 / 3"],
        ["90%", "410.0", "4,000.0", "9.76 x", "10.0", "10.0", "-", "- / -"],
    ]
    assert dedupe_rows(d) == [
        ["cache off", "3,000.0", "500.0", "6.00 x", "10.0", "10.0", "84%"],
    ]
    text = cache_section(d)
    assert "`--cache-max-bytes 67108864`" in text
    assert "| cache on, 90% repeats #1 " in text
    assert "| cache off, same text #1 " in text


def test_a_skipped_run_says_why() -> None:
    assert cache_section(CacheData(note="skipped: no cache")) == "_skipped: no cache_\n"


def test_the_suite_report_holds_the_section(tmp_path: Path) -> None:
    out = tmp_path / "benchmarks.md"
    d = SuiteData(quick=True)
    write_report(d, out)
    assert "## Embedding cache and in-flight dedupe (issue 16)\n" in out.read_text()
    assert "_Not measured in this run._" in out.read_text()
    d.cache = _canned()
    write_report(d, out)
    text = out.read_text()
    assert "| 30%     |" in text
    data = json.loads(out.with_suffix(".json").read_text())
    [first, *_] = data["cache"]["runs"]
    assert (first["cache"], first["repeat"], first["result"]["ok"]) == ("off", 0.3, 400)
    assert math.isclose(first["result"]["inputs_per_s"], 400)


def test_cli_refuses_bad_shares_before_starting_anything() -> None:
    out = CliRunner().invoke(app, ["bench", "cache", "--repeat", "0.3", "--repeat", "1.5"])
    assert out.exit_code != 0
    assert "shares" in out.output


def test_cli_without_the_cache_setting_says_so(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cache_bench, "cache_supported", lambda: False)
    out = CliRunner().invoke(app, ["bench", "cache", "--duration", "1"])
    assert out.exit_code == 1
    assert "no cache_max_bytes setting" in out.output
