"""The standard suite behind ``make bench``: one run, side by side, written to docs/.

Order: load-generator ceiling, first start (export) and second start (cache), offline ceiling
(fp32 and int8, in a child process each), the fp32 server (concurrency sweep, mixed lengths, TEI
route, the router slot, then rounds that rerun the target cells back to back with the offline
cells they are compared with, an optional soak), an overload run, the int8 server. Every child
process binds to 127.0.0.1 and every load run is bounded in time.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from rich.console import Console

from embedplex.bench.cache import (
    CacheBenchOptions,
    cache_supported,
    labelled,
    run_cache_bench,
)
from embedplex.bench.checks import new_seed
from embedplex.bench.load import LoadOptions, run_load_sync
from embedplex.bench.offline import OfflineResult
from embedplex.bench.report import StartRow, SuiteData, write_report
from embedplex.bench.server_proc import ServerProcess, free_port
from embedplex.bench.stats import LoadResult, load_table
from embedplex.bench.workload import TokenSpec
from embedplex.config import Settings
from embedplex.models.layout import InferenceLayout, inference_layout

console = Console(stderr=True)

SHORT = TokenSpec(14, 14)
MEDIUM = TokenSpec(128, 128)
MIXED = TokenSpec(5, 256)
CONCURRENCY = (1, 16, 64, 256)


@dataclass(frozen=True, kw_only=True)
class SuiteOptions:
    out: Path = Path("docs/benchmarks.md")
    quick: bool = False  # seconds instead of minutes: a smoke test of the whole suite
    router_url: str | None = None
    soak_s: float = 0.0  # mixed-length load this long on the fp32 server, RSS sampled
    server_port: int | None = None  # fixed port of the fp32 server, for a router to target
    work_dir: Path = Path("bench-results")
    extra_serve_args: list[str] = field(default_factory=list)

    @property
    def rounds(self) -> int:
        """Extra side-by-side rounds of the target cells (the first is the sweep itself)."""
        return 1 if self.quick else 3

    @property
    def duration(self) -> float:
        return 2.0 if self.quick else 15.0

    @property
    def offline_time(self) -> float:
        return 0.3 if self.quick else 3.0


def layouts() -> list[InferenceLayout]:
    """The server's default inference layout and, if different, one stream on every core: the
    ceiling is the faster of the two, so a layout never flatters the served ratio."""
    server = inference_layout(Settings.load(None))
    single = InferenceLayout(1, os.cpu_count() or 1)
    return [server] if server == single else [server, single]


def _offline(
    dtype: str,
    tokens: list[TokenSpec],
    batches: list[int],
    opts: SuiteOptions,
    cache_dir: Path,
    layout: InferenceLayout,
) -> tuple[list[OfflineResult], str]:
    """``embedplex bench offline`` in a child process, so its threads and memory go with it."""
    args = ["bench", "offline", "--dtype", dtype, "--min-time", str(opts.offline_time)]
    args += ["--streams", str(layout.streams), "--threads", str(layout.threads)]
    for t in tokens:
        args += ["--tokens", str(t)]
    for b in batches:
        args += ["--batch", str(b)]
    cmd = [
        sys.executable,
        "-c",
        "from embedplex.cli import main; main()",
        *args,
        "--json",
        "-",
    ]
    env_cache = {"EMBEDPLEX_CACHE_DIR": str(cache_dir)}
    done = subprocess.run(
        cmd,
        check=True,
        capture_output=True,
        text=True,
        env={**os.environ, **env_cache},
        timeout=900,
    )
    rows = [OfflineResult(**r) for r in json.loads(done.stdout)]
    return rows, "embedplex " + " ".join(args)


def _load(
    url: str,
    opts: SuiteOptions,
    *,
    setup: str,
    concurrency: int,
    tokens: TokenSpec = SHORT,
    duration: float | None = None,
    warmup: int | None = None,
    dialect: str = "openai",
    refusal_pause: float = 0.0,
    model: str | None = None,
    repeat: float | None = None,
    seed: int = 0,
) -> LoadResult:
    options = LoadOptions(
        url=url,
        dialect=dialect,
        duration=duration or opts.duration,
        concurrency=concurrency,
        tokens=tokens,
        setup=setup,
        warmup=concurrency * 2 if warmup is None else warmup,
        timeout=60.0,
        refusal_pause=refusal_pause,
        model=model,
        repeat=repeat,
        seed=seed,
    )
    result = run_load_sync(options)
    console.print(load_table([result]))
    return result


def _load_command(concurrency: int, tokens: TokenSpec, duration: float) -> str:
    return (
        f"embedplex bench load --url URL --concurrency {concurrency} --tokens {tokens} "
        f"--duration {duration:g}"
    )


def run_suite(opts: SuiteOptions) -> SuiteData:
    """Run everything, write the report, and return what was measured."""
    started = time.perf_counter()
    opts.work_dir.mkdir(parents=True, exist_ok=True)
    log = opts.work_dir / "server.log"
    data = SuiteData(quick=opts.quick)
    cache = Path(tempfile.mkdtemp(prefix="embedplex-bench-cache-"))
    try:
        _run(opts, data, cache, log)
    finally:
        shutil.rmtree(cache, ignore_errors=True)
    data.total_s = time.perf_counter() - started
    write_report(data, opts.out)
    console.print(f"[bold green]wrote {opts.out} in {data.total_s:.0f}s")
    return data


def _run(opts: SuiteOptions, data: SuiteData, cache: Path, log: Path) -> None:
    base = ["--cache-dir", str(cache), "--log-level", "warning", *opts.extra_serve_args]
    # The classic load cycles 512 bodies: with the embedding cache on, every request after the
    # 512th would be a hit. These sections measure computing embeddings, so their servers run
    # without it; the cache has its own section (run last, two servers side by side).
    serve = [*base, "--cache-max-bytes", "0"] if cache_supported() else base

    console.rule("load generator ceiling (trivial server)")
    port = free_port()
    echo = subprocess.Popen([sys.executable, "-m", "embedplex.bench.echo_server", str(port)])
    try:
        time.sleep(1.0)
        data.client_ceiling = _load(
            f"http://127.0.0.1:{port}",
            opts,
            setup="echo server",
            concurrency=64,
            duration=min(opts.duration, 5.0),
        )
    finally:
        echo.terminate()
        echo.wait(10)

    console.rule("first start (export) and second start (cached)")
    for dtype in ("float32", "int8"):
        for attempt in ("first", "second"):
            with ServerProcess([*serve, "--dtype", dtype], log=log) as srv:
                data.starts.append(
                    StartRow(dtype=dtype, attempt=attempt, seconds=srv.ready_s, command=srv.command)
                )
                console.print(f"{dtype} {attempt} start: {srv.ready_s:.1f}s")
    data.int8_cosine, data.int8_setting = _int8_quality(cache)

    console.rule("offline ceiling")
    for layout in layouts():
        for dtype, lengths, batches in (
            ("float32", [SHORT, MEDIUM], [1, 8, 32, 128]),
            ("float32", [MIXED], [64]),
            ("int8", [SHORT, MEDIUM], [1, 8, 128]),
        ):
            rows, cmd = _offline(dtype, lengths, batches, opts, cache, layout)
            data.offline += rows
            data.commands.append(cmd)

    console.rule("server, float32")
    with ServerProcess(serve, log=log, port=opts.server_port) as srv:
        data.commands.append(srv.command)
        data.rss_idle_mb, _ = srv.rss_mb()
        for c in CONCURRENCY:
            data.sweep.append(_load(srv.url, opts, setup=f"fp32 c={c}", concurrency=c))
        data.commands.append(_load_command(64, SHORT, opts.duration))
        data.mixed = _load(srv.url, opts, setup="fp32 mixed", concurrency=64, tokens=MIXED)
        data.commands.append(_load_command(64, MIXED, opts.duration))
        data.tei = _load(srv.url, opts, setup="fp32 c=64 tei", concurrency=64, dialect="tei")
        _router(opts, data, srv, log)
        for k in range(2, opts.rounds + 2):
            # The machine is shared: a noisy minute must not decide a ratio. Each round runs
            # the ceiling cells and the served cells they are compared with back to back.
            console.rule(f"side by side, round {k}: offline ceiling cells, then the same server")
            for layout in layouts():
                rows, _ = _offline("float32", [SHORT], [1, 8, 32, 128], opts, cache, layout)
                again, _ = _offline("float32", [MIXED], [64], opts, cache, layout)
                data.offline = best_of(data.offline, rows + again)
            for c, tokens in ((1, SHORT), (64, SHORT), (64, MIXED)):
                label = f"fp32 c={c}{' mixed' if tokens is MIXED else ''} #{k}"
                data.rounds.append(_load(srv.url, opts, setup=label, concurrency=c, tokens=tokens))
        if opts.soak_s > 0:
            _soak(srv, opts, data)
        data.rss_after_mb, data.rss_peak_mb = srv.rss_mb()

    console.rule("overload: admission limit 64, 128 clients that pause 50 ms after a 429")
    limited = [*serve, "--max-concurrent-requests", "64"]
    with ServerProcess(limited, log=log) as srv:
        data.commands.append(srv.command)
        data.overload = _load(
            srv.url,
            opts,
            setup="fp32 c=128 limit=64",
            concurrency=128,
            warmup=0,
            refusal_pause=0.05,
        )

    console.rule("server, int8")
    with ServerProcess([*serve, "--dtype", "int8"], log=log) as srv:
        data.commands.append(srv.command)
        data.int8_served = _load(srv.url, opts, setup="int8 c=64", concurrency=64)

    console.rule("embedding cache off vs on, repeated texts and dedupe (two servers at once)")
    options = CacheBenchOptions(
        duration=opts.duration,
        rounds=1 if opts.quick else 2,
        server_args=tuple(base),
        log_dir=opts.work_dir,
    )
    data.cache = run_cache_bench(
        options, on_run=lambda run: console.print(load_table([labelled(run)]))
    )
    if data.cache.note:
        console.print(data.cache.note)
    else:
        data.commands.append(
            f"embedplex bench cache --duration {options.duration:g} --rounds {options.rounds}"
        )


def _soak(srv: ServerProcess, opts: SuiteOptions, data: SuiteData) -> None:
    """Mixed-length load at c=64 for ``soak_s``, in ten slices; RSS read after each."""
    console.rule(f"soak: {opts.soak_s / 60:g} min of mixed-length load, RSS every slice")
    slice_s = opts.soak_s / 10
    for k in range(10):
        result = _load(
            srv.url,
            opts,
            setup=f"soak {k + 1}/10",
            concurrency=64,
            tokens=MIXED,
            duration=slice_s,
            warmup=0,
        )
        data.soak.append((round((k + 1) * slice_s), srv.rss_mb()[0], result.fail))


def best_of(first: list[OfflineResult], second: list[OfflineResult]) -> list[OfflineResult]:
    """Per (dtype, layout, tokens, batch) cell, the faster run: noise never lowers a ceiling."""
    best = {(r.dtype, r.layout, r.tokens, r.batch): r for r in first}
    for r in second:
        key = (r.dtype, r.layout, r.tokens, r.batch)
        if key not in best or r.texts_per_s > best[key].texts_per_s:
            best[key] = r
    return list(best.values())


def _int8_quality(cache: Path) -> tuple[float | None, str]:
    """The int8 export's gate result: min cosine vs fp32 and the setting that passed."""
    for quality in cache.glob("onnx/*/quality.json"):
        data = json.loads(quality.read_text())
        value = data.get("min_cosine")
        return (float(value) if value is not None else None), str(data.get("setting", ""))
    return None, ""


ROUTER_MODEL = "remote-minilm"


def router_env(upstream: str) -> dict[str, str]:
    """The environment of a providers-only router serving ROUTER_MODEL from ``upstream``
    (the provider settings of examples/router.toml), its embedding cache off as every other
    server of the suite: on, it would answer the load's repeats and the row would measure it."""
    provider = {
        "name": "upstream",
        "type": "openai",
        "endpoint": upstream,
        "model": "sentence-transformers/all-MiniLM-L6-v2",
        "max_batch_size": 128,
        "max_wait_ms": 100,
        "max_concurrency": 2,
    }
    route = {"model": ROUTER_MODEL, "providers": ["upstream"], "policy": "any"}
    env = {
        "EMBEDPLEX_LOCAL_MODEL": "false",
        "EMBEDPLEX_PROVIDERS": json.dumps([provider]),
        "EMBEDPLEX_ROUTES": json.dumps([route]),
    }
    return {**env, "EMBEDPLEX_CACHE_MAX_BYTES": "0"} if cache_supported() else env


def _router_load(url: str, opts: SuiteOptions, setup: str, model: str | None = None) -> LoadResult:
    """64 clients, every text new (``--repeat 0``, a seed of its own): neither a cache in front
    of the providers (a router given by ``--router-url`` may have one) nor dedupe can answer."""
    return _load(url, opts, setup=setup, concurrency=64, model=model, repeat=0.0, seed=new_seed())


def _router(opts: SuiteOptions, data: SuiteData, upstream: ServerProcess, log: Path) -> None:
    """Direct vs through a router whose one provider is ``upstream``, back to back.

    Without ``--router-url`` the suite starts its own router (``local_model = false``, one
    OpenAI-dialect provider, the settings of examples/router.toml, the cache off) on this
    machine: it shares the two cores with the server it forwards to.
    """
    if opts.router_url is not None:
        import httpx

        try:
            httpx.get(opts.router_url.rstrip("/") + "/health/ready", timeout=2.0).raise_for_status()
        except httpx.HTTPError as exc:
            data.router_note = f"skipped: router at {opts.router_url} not ready ({exc})"
            return
        data.router_direct = _router_load(upstream.url, opts, "direct c=64")
        data.router = _router_load(opts.router_url, opts, "via router c=64")
        return
    data.router_direct = _router_load(upstream.url, opts, "direct c=64")
    env = router_env(upstream.url)
    with ServerProcess(["--log-level", "warning"], log=log, env=env) as router:
        data.router = _router_load(router.url, opts, "via router c=64", model=ROUTER_MODEL)
    data.router_note = (
        "The router is a second `embedplex serve` (`local_model = false`, one OpenAI-dialect "
        "provider: the server above; the settings of examples/router.toml; the cache off) on the "
        "same two cores: it merges the 64 callers into upstream calls of up to 128 texts. Both "
        "rows send every text once (`--repeat 0`)."
    )
