"""``embedplex bench cache``: the embedding cache off and on, side by side, and dedupe.

Two servers run at once, same model and flags but ``--cache-max-bytes 0`` and the cache on.
Each round runs, for every repeat share (0%, 30%, 90% by default), the repeated-text load
(bench/repeats.py) against both, the side that goes first alternating from cell to cell; then
the dedupe workload (bench/dedupe.py: 64 callers, one new text per round, all at once, against
64 distinct texts) on both. Both sides of a cell get the same seed, so the same texts; every
cell has its own seed, so no text of one cell reaches a server again in another. Around every
run the servers' cache and dedupe counters are read from ``/metrics`` (bench/metrics.py).
"""

from __future__ import annotations

import statistics
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

from embedplex.bench import metrics
from embedplex.bench.dedupe import DedupeOptions, run_dedupe_sync
from embedplex.bench.load import LoadOptions, run_load_sync
from embedplex.bench.server_proc import ServerProcess
from embedplex.bench.stats import LoadResult, load_table, markdown_table
from embedplex.bench.workload import TokenSpec

DEFAULT_CACHE_BYTES = 64 * 1024 * 1024
SIDES = ("off", "on")


class Server(Protocol):
    @property
    def url(self) -> str: ...

    @property
    def command(self) -> str: ...


Launcher = Callable[[list[str], Path], AbstractContextManager[Server]]


def _server_process(args: list[str], log: Path) -> AbstractContextManager[Server]:
    return ServerProcess(args, log=log)


def cache_supported() -> bool:
    """Whether this embedplex has the cache setting the two servers are started with."""
    from embedplex.config import Settings

    return "cache_max_bytes" in Settings.model_fields


@dataclass(frozen=True, kw_only=True)
class CacheBenchOptions:
    duration: float = 15.0  # seconds measured per run
    concurrency: int = 64
    tokens: TokenSpec = field(default_factory=lambda: TokenSpec(14, 14))
    shares: tuple[float, ...] = (0.0, 0.3, 0.9)
    hot_set: int = 256
    rounds: int = 2
    callers: int = 64  # the dedupe workload's callers per round
    cache_bytes: int = DEFAULT_CACHE_BYTES
    server_args: tuple[str, ...] = ()
    log_dir: Path = Path("bench-results")

    def __post_init__(self) -> None:
        if self.duration <= 0 or self.rounds < 1:
            raise ValueError("duration must be positive and rounds at least 1")
        if self.concurrency < 1 or self.callers < 1 or self.hot_set < 1:
            raise ValueError("concurrency, callers and hot set must be at least 1")
        if not self.shares or any(not 0.0 <= s <= 1.0 for s in self.shares):
            raise ValueError(f"repeat shares must lie within [0, 1], got {self.shares!r}")
        if self.cache_bytes < 1:
            raise ValueError("the cache-on server needs --cache-bytes of at least 1")

    def side_args(self, side: str) -> list[str]:
        size = 0 if side == "off" else self.cache_bytes
        return ["--cache-max-bytes", str(size), *self.server_args]


@dataclass(frozen=True, kw_only=True)
class CacheRun:
    """One measured run against one side."""

    cache: str  # "off" or "on"
    workload: str  # "repeat", "same" (dedupe) or "distinct" (its baseline)
    repeat: float | None  # the share, for "repeat" runs
    round: int
    result: LoadResult
    counters: dict[str, float]  # what the run added to the server's counters; {}: none exposed

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "result": self.result.to_json()}


@dataclass(kw_only=True)
class CacheData:
    """Everything one cache benchmark measured, or why it did not run (``note``)."""

    runs: list[CacheRun] = field(default_factory=list)
    commands: list[str] = field(default_factory=list)
    concurrency: int = 0
    callers: int = 0
    hot_set: int = 0
    cache_bytes: int = 0
    tokens: str = ""
    duration: float = 0.0
    note: str = ""

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "runs": [r.to_json() for r in self.runs]}


def cells(options: CacheBenchOptions, round_: int) -> list[tuple[float, int, tuple[str, ...]]]:
    """(share, seed, side order) of each repeat cell of a round; the first side alternates from
    cell to cell and round to round, and the seed is the cell's own."""
    out: list[tuple[float, int, tuple[str, ...]]] = []
    for i, share in enumerate(options.shares):
        k = (round_ - 1) * len(options.shares) + i
        out.append((share, round_ * 1000 + i + 1, SIDES if k % 2 == 0 else SIDES[::-1]))
    return out


def run_cache_bench(
    options: CacheBenchOptions,
    *,
    launch: Launcher = _server_process,
    on_run: Callable[[CacheRun], None] | None = None,
) -> CacheData:
    """Start both servers, run every cell, return the runs (the servers are stopped after).

    ``on_run`` sees each run as it ends (the suite prints it).
    """
    data = CacheData(
        concurrency=options.concurrency,
        callers=options.callers,
        hot_set=options.hot_set,
        cache_bytes=options.cache_bytes,
        tokens=str(options.tokens),
        duration=options.duration,
    )
    if launch is _server_process and not cache_supported():
        data.note = "skipped: this embedplex has no cache_max_bytes setting (--cache-max-bytes)"
        return data
    log = options.log_dir / "cache-bench.log"
    with launch(options.side_args("off"), log) as off, launch(options.side_args("on"), log) as on:
        servers = {"off": off, "on": on}
        data.commands += [off.command, on.command]
        for r in range(1, options.rounds + 1):
            for share, seed, order in cells(options, r):
                for side in order:
                    run = _repeat_run(servers[side].url, options, share, seed)
                    data.runs.append(_measured(side, "repeat", share, r, servers[side].url, run))
                    if on_run:
                        on_run(data.runs[-1])
            _dedupe_round(options, servers, data, r, on_run)
    data.commands += commands(options)
    return data


Run = Callable[[Callable[[], None]], LoadResult]  # called with the hook that starts the count


def _measured(
    side: str, workload: str, share: float | None, round_: int, url: str, run: Run
) -> CacheRun:
    """``run`` with the server's counters read as its measured part starts and after it."""
    before: dict[str, float] = {}
    result = run(lambda: before.update(metrics.scrape(url)))
    counters = metrics.delta(before, metrics.scrape(url))
    return CacheRun(
        cache=side, workload=workload, repeat=share, round=round_, result=result, counters=counters
    )


def _repeat_run(url: str, options: CacheBenchOptions, share: float, seed: int) -> Run:
    load = LoadOptions(
        url=url,
        duration=options.duration,
        concurrency=options.concurrency,
        tokens=options.tokens,
        warmup=options.concurrency * 2,
        repeat=share,
        hot_set=options.hot_set,
        seed=seed,
    )
    return lambda on_start: run_load_sync(load, on_start=on_start)


def _dedupe_run(dedupe: DedupeOptions) -> Run:
    return lambda on_start: run_dedupe_sync(dedupe, on_start=on_start)


def _dedupe_round(
    options: CacheBenchOptions,
    servers: dict[str, Server],
    data: CacheData,
    round_: int,
    on_run: Callable[[CacheRun], None] | None,
) -> None:
    """Same text and distinct texts on both sides; who goes first alternates by round."""
    sides = SIDES if round_ % 2 else SIDES[::-1]
    for n, side in enumerate(sides):
        shapes = (True, False) if n % 2 == 0 else (False, True)
        for same in shapes:
            dedupe = DedupeOptions(
                url=servers[side].url,
                callers=options.callers,
                duration=options.duration,
                same_text=same,
                tokens=options.tokens,
                seed=round_ * 1000 + 500 + int(same),
            )
            data.runs.append(
                _measured(
                    side,
                    "same" if same else "distinct",
                    None,
                    round_,
                    servers[side].url,
                    _dedupe_run(dedupe),
                )
            )
            if on_run:
                on_run(data.runs[-1])


def commands(options: CacheBenchOptions) -> list[str]:
    """What each run was, as a user would type it against either server."""
    shares = " ".join(f"--repeat {s:g}" for s in options.shares)
    return [
        f"embedplex bench load --url URL --concurrency {options.concurrency} --tokens "
        f"{options.tokens} --duration {options.duration:g} --warmup {options.concurrency * 2} "
        f"--hot-set {options.hot_set} --seed SEED  # once each: {shares}",
        f"embedplex bench dedupe --url URL --callers {options.callers} --tokens {options.tokens} "
        f"--duration {options.duration:g}  # and again with --distinct",
    ]


# -- report ------------------------------------------------------------------------------------


def _median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def _count(runs: list[CacheRun], name: str) -> float | None:
    """The counter summed over ``runs``; None when no run's server exposed it."""
    seen = [r.counters[name] for r in runs if name in r.counters]
    return sum(seen) if seen else None


def _n(value: float | None) -> str:
    return "-" if value is None else f"{value:,.0f}"


def _rate(value: float) -> str:
    return "-" if value != value else f"{value:,.1f}"  # NaN: no run


def _ratio(a: float, b: float) -> str:
    return f"{a / b:.2f} x" if b and a == a and b == b else "-"


def repeat_rows(d: CacheData) -> list[list[str]]:
    rows = []
    shares = sorted({r.repeat for r in d.runs if r.workload == "repeat" and r.repeat is not None})
    for share in shares:
        cell = {
            side: [
                r
                for r in d.runs
                if r.workload == "repeat" and r.repeat == share and r.cache == side
            ]
            for side in SIDES
        }
        rate = {s: _median([r.result.inputs_per_s for r in cell[s]]) for s in SIDES}
        p50 = {s: _median([r.result.p50_ms for r in cell[s]]) for s in SIDES}
        hits, misses = _count(cell["on"], metrics.HITS), _count(cell["on"], metrics.MISSES)
        hit_rate = (
            "-"
            if hits is None or not (hits + (misses or 0))
            else (f"{hits / (hits + (misses or 0)):.0%}")
        )
        joined = " / ".join(_n(_count(cell[s], metrics.JOINED)) for s in SIDES)
        rows.append(
            [
                f"{share:.0%}",
                _rate(rate["off"]),
                _rate(rate["on"]),
                _ratio(rate["on"], rate["off"]),
                _rate(p50["off"]),
                _rate(p50["on"]),
                hit_rate,
                joined,
            ]
        )
    return rows


REPEAT_HEADER = (
    "repeats",
    "cache off inputs/s",
    "cache on inputs/s",
    "on / off",
    "off p50 ms",
    "on p50 ms",
    "hit rate (on)",
    "dedupe joined (off / on)",
)


def dedupe_rows(d: CacheData) -> list[list[str]]:
    rows = []
    for side in SIDES:
        by = {
            w: [r for r in d.runs if r.workload == w and r.cache == side]
            for w in ("same", "distinct")
        }
        rate = {w: _median([r.result.inputs_per_s for r in runs]) for w, runs in by.items()}
        if not by["same"] and not by["distinct"]:
            continue
        p99 = {w: _median([r.result.p99_ms for r in runs]) for w, runs in by.items()}
        joined = _count(by["same"], metrics.JOINED)
        requests = sum(r.result.ok for r in by["same"])
        share = "-" if joined is None or not requests else f"{joined / requests:.0%}"
        rows.append(
            [
                f"cache {side}",
                _rate(rate["same"]),
                _rate(rate["distinct"]),
                _ratio(rate["same"], rate["distinct"]),
                _rate(p99["same"]),
                _rate(p99["distinct"]),
                share,
            ]
        )
    return rows


DEDUPE_HEADER = (
    "server",
    "same text inputs/s",
    "distinct inputs/s",
    "same / distinct",
    "same p99 ms",
    "distinct p99 ms",
    "joined (same text)",
)


def cache_section(d: CacheData) -> str:
    """The markdown the suite puts under its cache heading (the explanation is the caller's)."""
    if d.note:
        return f"_{d.note}_\n"
    out = [
        f"Repeated-text load: {d.concurrency} clients, single {d.tokens}-token texts, "
        f"{d.duration:g} s per run, hot set of {d.hot_set} texts; cache on = "
        f"`--cache-max-bytes {d.cache_bytes}`. Medians over the rounds; hit rate and dedupe "
        "joins from the servers' `/metrics`, summed over the rounds.\n",
        markdown_table(REPEAT_HEADER, repeat_rows(d)) + "\n",
        f"Dedupe: {d.callers} callers send one identical new text at the same moment, round "
        f"after round, against {d.callers} distinct texts per round (nothing to share); "
        "`joined` is the share of the same-text requests the server answered by joining an "
        "identical input already in flight.\n",
        markdown_table(DEDUPE_HEADER, dedupe_rows(d)) + "\n",
        "Every run:\n",
        load_table([labelled(r) for r in d.runs]) + "\n",
    ]
    return "\n".join(out)


def labelled(run: CacheRun) -> LoadResult:
    """The run's result with a label that says which side and workload it was."""
    what = f"{run.repeat:.0%} repeats" if run.repeat is not None else f"{run.workload} text"
    label = f"cache {run.cache}, {what} #{run.round}"
    return LoadResult(**{**asdict(run.result), "setup": label})
