"""The suite's results, its targets check, and the markdown report (docs/benchmarks.md)."""

from __future__ import annotations

import json
import math
import os
import platform
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any

from embedplex.bench.cache import CacheData
from embedplex.bench.offline import OfflineResult
from embedplex.bench.stats import LoadResult

_PACKAGES = (
    "embedplex",
    "onnxruntime",
    "onnx",
    "numpy",
    "tokenizers",
    "torch",
    "fastapi",
    "starlette",
    "uvicorn",
    "uvloop",
    "httptools",
    "orjson",
)


@dataclass(frozen=True, kw_only=True)
class StartRow:
    dtype: str
    attempt: str  # "first" (empty cache: export) or "second" (cached)
    seconds: float
    command: str


@dataclass(kw_only=True)
class SuiteData:
    """Everything one suite run measured."""

    quick: bool = False
    total_s: float = 0.0
    commands: list[str] = field(default_factory=list)
    client_ceiling: LoadResult | None = None
    starts: list[StartRow] = field(default_factory=list)
    int8_cosine: float | None = None
    int8_setting: str = ""
    offline: list[OfflineResult] = field(default_factory=list)
    sweep: list[LoadResult] = field(default_factory=list)
    rounds: list[LoadResult] = field(default_factory=list)  # target cells, run again later
    mixed: LoadResult | None = None
    tei: LoadResult | None = None
    overload: LoadResult | None = None
    int8_served: LoadResult | None = None
    router: LoadResult | None = None
    router_direct: LoadResult | None = None
    router_note: str = ""
    soak: list[tuple[int, float, int]] = field(default_factory=list)  # (s, RSS MB, failures)
    rss_idle_mb: float = 0.0
    rss_after_mb: float = 0.0
    rss_peak_mb: float = 0.0
    cache: CacheData | None = None  # the embedding cache off vs on, and dedupe (bench/cache.py)

    def to_json(self) -> dict[str, Any]:
        def conv(value: Any) -> Any:
            if isinstance(value, LoadResult | OfflineResult | CacheData):
                return value.to_json()
            if isinstance(value, StartRow):
                return asdict(value)
            if isinstance(value, list):
                return [conv(v) for v in value]
            return value

        return {name: conv(getattr(self, name)) for name in self.__dataclass_fields__}

    # -- derived figures -------------------------------------------------------------------

    def ceiling(
        self, dtype: str, tokens: str, *, streams: int | None = None
    ) -> OfflineResult | None:
        """The fastest offline cell for ``tokens``, over every layout or those of ``streams``."""
        cells = [
            r
            for r in self.offline
            if r.dtype == dtype and r.tokens == tokens and streams in (None, r.streams)
        ]
        return max(cells, key=lambda r: r.texts_per_s, default=None)

    def offline_cell(self, dtype: str, tokens: str, batch: int) -> OfflineResult | None:
        """The fastest single pass (lowest ms/batch p50) of this cell over one-stream layouts."""
        cells = [
            r
            for r in self.offline
            if r.dtype == dtype and r.tokens == tokens and r.batch == batch and r.streams == 1
        ]
        return min(cells, key=lambda r: r.ms_per_batch_p50, default=None)

    def at(self, concurrency: int) -> LoadResult | None:
        return next((r for r in self.sweep if r.concurrency == concurrency), None)

    def best(self, concurrency: int, tokens: str) -> LoadResult | None:
        """The fastest fp32 OpenAI-route run of a target cell, over the sweep and the rounds."""
        runs = [*self.sweep, *([self.mixed] if self.mixed else []), *self.rounds]
        cells = [r for r in runs if r.concurrency == concurrency and r.tokens == tokens]
        return max(cells, key=lambda r: r.req_per_s, default=None)

    def fastest_p50(self, concurrency: int) -> LoadResult | None:
        runs = [r for r in [*self.sweep, *self.rounds] if r.concurrency == concurrency]
        return min(runs, key=lambda r: r.p50_ms, default=None)


def machine() -> dict[str, str]:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
        mem_kb = int(Path("/proc/meminfo").read_text().split()[1])
        memory = f"{mem_kb / 1024 / 1024:.1f} GiB"
    except (OSError, ValueError, IndexError):
        memory = "unknown"
    versions = []
    for name in _PACKAGES:
        try:
            versions.append(f"{name} {metadata.version(name)}")
        except metadata.PackageNotFoundError:
            continue
    return {
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "cpu": f"{cpu}, {os.cpu_count()} cores",
        "memory": memory,
        "os": f"{platform.system()} {platform.release()}",
        "python": platform.python_version(),
        "packages": ", ".join(versions),
    }


def _ratio(a: float | None, b: float | None) -> float:
    if a is None or b is None or not b:
        return math.nan
    return a / b


def _versus(served: float | None, ceiling: OfflineResult | None) -> tuple[float, str]:
    """``served`` over ``ceiling``'s rate, and the figure that shows both and the cell."""
    r = _ratio(served, ceiling.texts_per_s if ceiling else None)
    if served is None or ceiling is None:
        return r, f"{r:.2f} x"
    rate = ",.0f" if ceiling.texts_per_s >= 100 else ",.1f"
    return r, (
        f"{r:.2f} x ({served:{rate}} vs {ceiling.texts_per_s:{rate}}/s, "
        f"{ceiling.layout} batch {ceiling.batch})"
    )


def targets(d: SuiteData) -> list[list[str]]:
    """Each issue-3 target with the figure measured in this run, and whether it is met."""
    rows: list[list[str]] = []

    def add(name: str, figure: str, ok: bool | None) -> None:
        rows.append([name, figure, "-" if ok is None else ("met" if ok else "NOT met")])

    c64, mixed = d.best(64, "14"), d.best(64, "5-256")
    for name, tokens, served, need in (
        ("c=64 short req/s", "14", c64.req_per_s if c64 else None, 0.90),
        ("mixed 5-256 inputs/s", "5-256", mixed.inputs_per_s if mixed else None, 0.85),
    ):
        best = d.ceiling("float32", tokens)
        r, figure = _versus(served, best)
        add(f"{name} >= {need:.2f} x offline ceiling", figure, r >= need)
        single = d.ceiling("float32", tokens, streams=1)
        if single is not None and best is not None and single is not best:
            add(
                f"{name} vs the one-stream ceiling (for reference)",
                _versus(served, single)[1],
                None,
            )
    c1, one = d.fastest_p50(1), d.offline_cell("float32", "14", 1)
    if c1 and one:
        bound = 1.2 * one.ms_per_batch_p50 + 2.0
        add(
            "c=1 p50 <= 1.2 x offline batch-1 + 2 ms",
            f"{c1.p50_ms:.2f} ms (bound {bound:.2f} ms)",
            c1.p50_ms <= bound,
        )
    fails = sum(r.fail for r in d.sweep) + (d.mixed.fail if d.mixed else 0)
    add("no failures below saturation", f"{fails} failed", fails == 0)
    if d.overload:
        o = d.overload
        add(
            "refusals are fast 429s (p99 < 20 ms)",
            f"{o.status_429:,} x 429, p99 {o.refused_p99_ms:.2f} ms",
            o.status_429 > 0 and o.refused_p99_ms < 20,
        )
        add(
            "accepted p99 under overload bounded by queue timeout (30 s)",
            f"{o.p99_ms:,.0f} ms",
            o.p99_ms < 30_000,
        )
    add(
        "server RSS < 600 MB",
        f"{d.rss_peak_mb:.0f} MB peak ({d.rss_idle_mb:.0f} MB idle)",
        0 < d.rss_peak_mb < 600,
    )
    if d.soak:
        rss_first, rss_last = d.soak[0][1], d.soak[-1][1]
        add(
            f"RSS flat over a {d.soak[-1][0] / 60:g}-minute soak",
            f"{rss_first:.0f} -> {rss_last:.0f} MB, {sum(f for _, _, f in d.soak)} failed",
            rss_last <= rss_first * 1.05 and not any(f for _, _, f in d.soak),
        )
    cos = d.int8_cosine
    add(
        "int8 min cosine >= 0.97 vs fp32",
        "-" if cos is None else f"{cos:.4f}",
        None if cos is None else cos >= 0.97,
    )
    fp, q = d.ceiling("float32", "14"), d.ceiling("int8", "14")
    r = _ratio(q.texts_per_s if q else None, fp.texts_per_s if fp else None)
    add("int8 offline speed-up (short, best batch)", f"{r:.2f} x", None)
    fp, q = d.ceiling("float32", "128"), d.ceiling("int8", "128")
    r = _ratio(q.texts_per_s if q else None, fp.texts_per_s if fp else None)
    add("int8 offline speed-up (128 tokens, best batch)", f"{r:.2f} x", None)
    fp_served = d.at(64)
    r = _ratio(
        d.int8_served.req_per_s if d.int8_served else None,
        fp_served.req_per_s if fp_served else None,
    )
    add("int8 served speed-up (c=64 short)", f"{r:.2f} x", None)
    first = {s.dtype: s.seconds for s in d.starts if s.attempt == "first"}
    second = {s.dtype: s.seconds for s in d.starts if s.attempt == "second"}
    if "float32" in first and "float32" in second:
        add(
            "second start reuses the cached export",
            f"{first['float32']:.1f} s first, {second['float32']:.1f} s second",
            second["float32"] < first["float32"],
        )
    return rows


def _plot(d: SuiteData, path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    xs = [r.concurrency for r in d.sweep]
    fig, ax = plt.subplots(figsize=(7, 4.4), dpi=110)
    ax.plot(xs, [r.req_per_s for r in d.sweep], "o-", color="tab:blue", label="served req/s")
    short = d.ceiling("float32", "14")
    if short:
        ax.axhline(short.texts_per_s, ls="--", color="tab:gray", label="offline ceiling")
    ax.set_xscale("log", base=2)
    ax.set_xticks(xs, [str(x) for x in xs])
    ax.set_ylim(bottom=0)
    ax.set_xlabel("concurrent single-text clients (14 tokens)")
    ax.set_ylabel("requests / s")
    ax2 = ax.twinx()
    ax2.plot(xs, [r.p99_ms for r in d.sweep], "s-", color="tab:red", label="p99 latency")
    ax2.set_yscale("log")
    ax2.set_ylabel("p99 latency (ms)")
    lines = ax.get_legend_handles_labels()
    lines2 = ax2.get_legend_handles_labels()
    ax.legend(
        lines[0] + lines2[0],
        lines[1] + lines2[1],
        loc="upper center",
        bbox_to_anchor=(0.5, -0.18),
        ncol=3,
        frameon=False,
    )
    ax.set_title("embedplex, all-MiniLM-L6-v2, ONNX Runtime fp32")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return True


def write_report(d: SuiteData, out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    png = out.with_name("benchmarks-concurrency.png")
    plotted = bool(d.sweep) and _plot(d, png)
    out.with_suffix(".json").write_text(json.dumps(d.to_json(), indent=2) + "\n")
    out.write_text(render(d, png.name if plotted else None))


def render(d: SuiteData, png: str | None) -> str:
    from embedplex.bench.report_text import render_markdown

    return render_markdown(d, machine(), targets(d), png)
