from __future__ import annotations

import math

import numpy as np
import pytest

from embedplex.bench.stats import COLUMNS, LoadResult, Outcomes, load_table, percentile


@pytest.mark.parametrize("q", [0, 1, 25, 50, 90, 95, 99, 99.9, 100])
def test_percentile_matches_numpy_linear(q: float) -> None:
    values = [float(v) for v in np.random.default_rng(1).exponential(3.0, 257)]
    assert percentile(values, q) == pytest.approx(float(np.percentile(values, q)))


def test_percentile_edges() -> None:
    assert math.isnan(percentile([], 50))
    assert percentile([4.0], 99) == 4.0
    assert percentile([1.0, 2.0], 50) == 1.5
    with pytest.raises(ValueError, match="within"):
        percentile([1.0], 101)


def _outcomes() -> Outcomes:
    out = Outcomes()
    for ms in range(1, 101):
        out.record(200, ms / 1000)
    out.record(429, 0.002)
    out.record(429, 0.004)
    out.record(503, 0.5)
    out.record(422, 0.001)
    out.error("ConnectionRefusedError")
    return out


def _summary(out: Outcomes) -> LoadResult:
    return LoadResult.summarize(
        out,
        setup="test",
        url="http://127.0.0.1:1",
        dialect="openai",
        tokens="14",
        concurrency=8,
        inputs_per_request=2,
        elapsed_s=2.0,
    )


def test_outcomes_count_each_kind_apart() -> None:
    out = _outcomes()
    assert len(out.ok) == 100
    assert len(out.refused) == 2
    assert len(out.unavailable) == 1
    assert out.other_status == {422: 1}
    assert out.done == 105


def test_summary_rates_and_percentiles() -> None:
    r = _summary(_outcomes())
    assert (r.requests, r.ok, r.fail) == (105, 100, 5)
    assert (r.status_429, r.status_503) == (2, 1)
    assert r.req_per_s == pytest.approx(50.0)
    assert r.inputs_per_s == pytest.approx(100.0)
    assert r.p50_ms == pytest.approx(50.5)
    assert r.p99_ms == pytest.approx(99.01)
    assert r.refused_p99_ms == pytest.approx(3.98)
    assert r.other_status == {"422": 1}


def test_table_has_the_standard_columns_and_notes() -> None:
    table = load_table([_summary(_outcomes())])
    header = table.splitlines()[0]
    assert [c.strip() for c in header.strip("|").split("|")] == list(COLUMNS)
    row = table.splitlines()[2]
    assert "| test " in row
    assert "50.0" in row
    assert "429 x 2 (p99 3.98 ms)" in table
    assert "503 x 1" in table
    assert "ConnectionRefusedError x 1" in table


def test_json_has_no_nan() -> None:
    r = _summary(Outcomes())
    data = r.to_json()
    assert data["p99_ms"] is None
    assert data["ok"] == 0
    assert r.failure_note() == ""
