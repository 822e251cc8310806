"""The suite's report: targets computed from the figures, markdown and JSON written."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from embedplex.bench.offline import OfflineResult
from embedplex.bench.report import StartRow, SuiteData, targets, write_report
from embedplex.bench.stats import LoadResult, Outcomes
from embedplex.config import Settings


def _offline(dtype: str, tokens: str, batch: int, rate: float, streams: int = 1) -> OfflineResult:
    return OfflineResult(
        backend="onnx",
        dtype=dtype,
        tokens=tokens,
        padded_length=14,
        batch=batch,
        batches=3,
        ms_per_batch_p50=batch / rate * 1000 * streams,
        texts_per_s=rate,
        streams=streams,
        threads=2 // streams,
    )


def _load(concurrency: int, ok: int, ms: float, tokens: str = "14") -> LoadResult:
    out = Outcomes()
    for _ in range(ok):
        out.record(200, ms / 1000)
    return LoadResult.summarize(
        out,
        setup=f"c={concurrency}",
        url="http://127.0.0.1:1",
        dialect="openai",
        tokens=tokens,
        concurrency=concurrency,
        inputs_per_request=1,
        elapsed_s=1.0,
    )


def _data() -> SuiteData:
    d = SuiteData(quick=True, router_note="skipped: no router given")
    d.offline = [
        _offline("float32", "14", 1, 300.0),  # 3.33 ms per batch
        _offline("float32", "14", 128, 500.0),
        _offline("float32", "5-256", 32, 40.0),
        _offline("float32", "128", 8, 40.0),
        _offline("int8", "14", 128, 900.0),
        _offline("int8", "128", 8, 80.0),
    ]
    d.sweep = [_load(1, 150, 5.0), _load(64, 460, 130.0)]
    d.mixed = _load(64, 30, 900.0, "5-256")
    d.starts = [
        StartRow(dtype="float32", attempt="first", seconds=9.0, command="embedplex serve"),
        StartRow(dtype="float32", attempt="second", seconds=3.0, command="embedplex serve"),
    ]
    d.int8_cosine = 0.98
    d.rss_idle_mb, d.rss_peak_mb = 250.0, 550.0
    return d


def test_targets_reflect_the_figures() -> None:
    rows = {name: (figure, status) for name, figure, status in targets(_data())}
    assert rows["c=64 short req/s >= 0.90 x offline ceiling"] == (
        "0.92 x (460 vs 500/s, 1x2 batch 128)",
        "met",
    )
    assert rows["mixed 5-256 inputs/s >= 0.85 x offline ceiling"] == (
        "0.75 x (30.0 vs 40.0/s, 1x2 batch 32)",
        "NOT met",
    )
    assert rows["c=1 p50 <= 1.2 x offline batch-1 + 2 ms"][1] == "met"  # 5 <= 1.2*3.33+2
    assert rows["int8 offline speed-up (short, best batch)"] == ("1.80 x", "-")
    assert rows["int8 min cosine >= 0.97 vs fp32"] == ("0.9800", "met")
    assert rows["server RSS < 600 MB"][1] == "met"
    assert rows["second start reuses the cached export"][1] == "met"


def test_the_ceiling_is_the_fastest_layout() -> None:
    d = _data()
    # Two streams of one thread beat one of two: they set the ceiling; the one-stream figure
    # stays as a reference, and c=1 is still held to the fastest single batch-1 pass.
    d.offline += [
        _offline("float32", "14", 32, 600.0, 2),
        _offline("float32", "14", 1, 500.0, 2),
        _offline("float32", "5-256", 64, 50.0, 2),
    ]
    rows = {name: (figure, status) for name, figure, status in targets(d)}
    assert rows["c=64 short req/s >= 0.90 x offline ceiling"] == (
        "0.77 x (460 vs 600/s, 2x1 batch 32)",
        "NOT met",
    )
    assert rows["c=64 short req/s vs the one-stream ceiling (for reference)"] == (
        "0.92 x (460 vs 500/s, 1x2 batch 128)",
        "-",
    )
    assert rows["mixed 5-256 inputs/s >= 0.85 x offline ceiling"][0] == (
        "0.60 x (30.0 vs 50.0/s, 2x1 batch 64)"
    )
    assert rows["mixed 5-256 inputs/s vs the one-stream ceiling (for reference)"][0] == (
        "0.75 x (30.0 vs 40.0/s, 1x2 batch 32)"
    )
    assert rows["c=1 p50 <= 1.2 x offline batch-1 + 2 ms"][0] == "5.00 ms (bound 6.00 ms)"


def test_targets_take_the_best_run_of_each_cell() -> None:
    d = _data()
    d.rounds = [_load(64, 480, 120.0), _load(1, 100, 4.0)]
    rows = {name: (figure, status) for name, figure, status in targets(d)}
    assert rows["c=64 short req/s >= 0.90 x offline ceiling"][0].startswith("0.96 x")
    assert rows["c=1 p50 <= 1.2 x offline batch-1 + 2 ms"][0].startswith("4.00 ms")


def test_soak_row() -> None:
    d = _data()
    d.soak = [(60 * k, 460.0 + k, 0) for k in range(1, 11)]
    rows = {name: (figure, status) for name, figure, status in targets(d)}
    assert rows["RSS flat over a 10-minute soak"] == ("461 -> 470 MB, 0 failed", "met")
    d.soak[-1] = (600, 600.0, 0)
    rows = {name: (figure, status) for name, figure, status in targets(d)}
    assert rows["RSS flat over a 10-minute soak"][1] == "NOT met"


def test_report_is_written(tmp_path: Path) -> None:
    out = tmp_path / "docs" / "benchmarks.md"
    write_report(_data(), out)
    text = out.read_text()
    assert text.startswith("# Benchmarks")
    assert "## Targets (issue 3)" in text
    assert "skipped: no router given" in text
    assert "| setup " in text
    data = json.loads(out.with_suffix(".json").read_text())
    assert data["sweep"][1]["concurrency"] == 64


def test_router_url_not_ready_is_skipped_with_a_note(tmp_path: Path) -> None:
    import socket

    from embedplex.bench.server_proc import ServerProcess
    from embedplex.bench.suite import SuiteOptions, _router

    d = SuiteData()
    upstream = ServerProcess([], log=tmp_path / "unused.log")  # never started: not reached
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{sock.getsockname()[1]}"
        _router(SuiteOptions(router_url=url), d, upstream, tmp_path / "log")
    assert d.router is None
    assert d.router_direct is None
    assert "not ready" in d.router_note


def test_the_suites_router_config_is_valid() -> None:
    """The router the suite starts: a providers-only server whose one route is its upstream."""
    from embedplex.bench.suite import ROUTER_MODEL, router_env

    env = router_env("http://127.0.0.1:9")
    with pytest.MonkeyPatch.context() as mp:
        for key, value in env.items():
            mp.setenv(key, value)
        settings = Settings.load(None)
    assert settings.local_model is False
    [provider] = settings.providers
    [route] = settings.routes
    assert provider.endpoint == "http://127.0.0.1:9"
    assert route.model == ROUTER_MODEL
    assert route.providers == [provider.name]
    assert settings.cache_max_bytes == 0  # as every server of the suite: the row measures routing


def test_the_suites_router_rows_send_every_text_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fake_process: Any
) -> None:
    """Direct and via the router: every text new, each run its own seed, so neither a cache
    (a router given by --router-url may have one) nor dedupe answers them."""
    from embedplex.bench import suite
    from embedplex.bench.load import LoadOptions
    from embedplex.bench.server_proc import ServerProcess

    loads: list[LoadOptions] = []

    def run(options: LoadOptions) -> LoadResult:
        loads.append(options)
        return _load(options.concurrency, 10, 5.0)

    monkeypatch.setattr(suite, "ServerProcess", fake_process)
    monkeypatch.setattr(suite, "run_load_sync", run)
    d = SuiteData()
    upstream = ServerProcess([], log=tmp_path / "unused.log")  # never started
    suite._router(suite.SuiteOptions(), d, upstream, tmp_path / "log")
    [(_, env)] = fake_process.started
    assert env["EMBEDPLEX_CACHE_MAX_BYTES"] == "0"
    assert [(o.url, o.repeat) for o in loads] == [(upstream.url, 0.0), (fake_process.url, 0.0)]
    assert loads[0].seed != loads[1].seed
    assert d.router is not None and d.router_direct is not None
