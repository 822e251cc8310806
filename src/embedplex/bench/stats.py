"""What one load run measured, and how it is summarized: percentiles, rows, tables, JSON."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

COLUMNS = (
    "setup",
    "requests",
    "tokens",
    "concurrency",
    "req/s",
    "inputs/s",
    "ok",
    "fail",
    "p50",
    "p95",
    "p99",
)


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (0..100), linear interpolation (numpy's default); NaN if empty."""
    if not 0 <= q <= 100:
        raise ValueError(f"percentile must be within [0, 100], got {q}")
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100
    low = math.floor(rank)
    high = math.ceil(rank)
    if low == high:
        return ordered[low]
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


@dataclass(slots=True)
class Outcomes:
    """Raw per-request outcomes, appended by the load workers (latencies in seconds)."""

    ok: list[float] = field(default_factory=list)
    refused: list[float] = field(default_factory=list)  # 429
    unavailable: list[float] = field(default_factory=list)  # 503
    other_status: dict[int, int] = field(default_factory=dict)
    errors: dict[str, int] = field(default_factory=dict)  # connection-level failures
    # Requests still open when the run ended (cancelled): neither answered nor failed.
    unfinished: int = 0
    # When the last request finished (time.perf_counter; 0.0: none has), set by the load workers.
    last_at: float = 0.0

    def record(self, status: int, latency: float) -> None:
        if 200 <= status < 300:
            self.ok.append(latency)
        elif status == 429:
            self.refused.append(latency)
        elif status == 503:
            self.unavailable.append(latency)
        else:
            self.other_status[status] = self.other_status.get(status, 0) + 1

    def error(self, kind: str) -> None:
        self.errors[kind] = self.errors.get(kind, 0) + 1

    @property
    def done(self) -> int:
        return (
            len(self.ok)
            + len(self.refused)
            + len(self.unavailable)
            + sum(self.other_status.values())
            + sum(self.errors.values())
        )


@dataclass(frozen=True, kw_only=True)
class LoadResult:
    """The summary of one run; every latency is in milliseconds."""

    setup: str
    url: str
    dialect: str
    requests: int
    tokens: str
    concurrency: int
    inputs_per_request: int
    elapsed_s: float
    ok: int
    fail: int
    status_429: int
    status_503: int
    other_status: dict[str, int]
    errors: dict[str, int]
    unfinished: int
    req_per_s: float
    inputs_per_s: float
    p50_ms: float
    p95_ms: float
    p99_ms: float
    mean_ms: float
    max_ms: float
    refused_p99_ms: float

    @classmethod
    def summarize(
        cls,
        outcomes: Outcomes,
        *,
        setup: str,
        url: str,
        dialect: str,
        tokens: str,
        concurrency: int,
        inputs_per_request: int,
        elapsed_s: float,
    ) -> LoadResult:
        ok = outcomes.ok
        ms = [v * 1000 for v in ok]
        elapsed = max(elapsed_s, 1e-9)
        return cls(
            setup=setup,
            url=url,
            dialect=dialect,
            requests=outcomes.done,
            tokens=tokens,
            concurrency=concurrency,
            inputs_per_request=inputs_per_request,
            elapsed_s=elapsed_s,
            ok=len(ok),
            fail=outcomes.done - len(ok),
            status_429=len(outcomes.refused),
            status_503=len(outcomes.unavailable),
            other_status={str(k): v for k, v in sorted(outcomes.other_status.items())},
            errors=dict(sorted(outcomes.errors.items())),
            unfinished=outcomes.unfinished,
            req_per_s=len(ok) / elapsed,
            inputs_per_s=len(ok) * inputs_per_request / elapsed,
            p50_ms=percentile(ms, 50),
            p95_ms=percentile(ms, 95),
            p99_ms=percentile(ms, 99),
            mean_ms=sum(ms) / len(ms) if ms else math.nan,
            max_ms=max(ms) if ms else math.nan,
            refused_p99_ms=percentile([v * 1000 for v in outcomes.refused], 99),
        )

    def row(self) -> list[str]:
        return [
            self.setup,
            f"{self.requests:,}",
            self.tokens,
            f"{self.concurrency:,}",
            f"{self.req_per_s:,.1f}",
            f"{self.inputs_per_s:,.1f}",
            f"{self.ok:,}",
            f"{self.fail:,}",
            _ms(self.p50_ms),
            _ms(self.p95_ms),
            _ms(self.p99_ms),
        ]

    def failure_note(self) -> str:
        """One line on what failed and how, and what never finished (empty when neither)."""
        if not (self.fail or self.unfinished):
            return ""
        parts = []
        if self.status_429:
            parts.append(f"429 x {self.status_429:,} (p99 {_ms(self.refused_p99_ms)} ms)")
        if self.status_503:
            parts.append(f"503 x {self.status_503:,}")
        parts += [f"{code} x {n:,}" for code, n in self.other_status.items()]
        parts += [f"{kind} x {n:,}" for kind, n in self.errors.items()]
        if self.unfinished:
            parts.append(f"unfinished x {self.unfinished:,} (still open at the end: cancelled)")
        return f"{self.setup}: " + ", ".join(parts)

    def to_json(self) -> dict[str, Any]:
        return {
            k: (None if isinstance(v, float) and math.isnan(v) else v)
            for k, v in asdict(self).items()
        }


def _ms(value: float) -> str:
    return "-" if math.isnan(value) else f"{value:,.2f}"


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A GitHub markdown table, the first column left-aligned, the others right-aligned."""
    widths = [len(h) for h in header]
    for row in rows:
        widths = [max(w, len(c)) for w, c in zip(widths, row, strict=True)]

    def line(cells: Sequence[str]) -> str:
        padded = [
            c.ljust(w) if i == 0 else c.rjust(w)
            for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        ]
        return "| " + " | ".join(padded) + " |"

    rule = (
        "|"
        + "|".join(
            ("-" * (w + 1) + ":") if i else (":" + "-" * (w + 1)) for i, w in enumerate(widths)
        )
        + "|"
    )
    return "\n".join([line(header), rule, *(line(r) for r in rows)])


def load_table(results: Sequence[LoadResult]) -> str:
    """The load results as the standard table, with failure notes under it."""
    table = markdown_table(COLUMNS, [r.row() for r in results])
    notes = [n for n in (r.failure_note() for r in results) if n]
    return table + ("\n\n" + "\n".join(f"- {n}" for n in notes) if notes else "")
