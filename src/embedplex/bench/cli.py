"""``embedplex bench``: load, offline, fairness, the suite. Heavy imports stay inside commands."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Any

import typer

bench_app = typer.Typer(help="Measure: load against an endpoint, or the backend alone.")


@bench_app.command("load")
def load(
    url: Annotated[str, typer.Option(help="Base URL (or full URL with a path).")] = (
        "http://127.0.0.1:8080"
    ),
    dialect: Annotated[str, typer.Option(help="openai (/v1/embeddings) or tei (/embed).")] = (
        "openai"
    ),
    requests: Annotated[int | None, typer.Option(help="Stop after this many answers.")] = None,
    duration: Annotated[
        float | None,
        typer.Option(
            help="Stop sending after this many seconds; a request still open gets a tenth of "
            "that (at least 1 s) to finish, then is cancelled and counted unfinished."
        ),
    ] = None,
    concurrency: Annotated[int, typer.Option(help="Workers, one connection each.")] = 16,
    tokens: Annotated[str, typer.Option(help="Tokens per input: N or LOW-HIGH (uniform).")] = "14",
    inputs_per_request: Annotated[int, typer.Option(help="Texts per request.")] = 1,
    model: Annotated[str | None, typer.Option(help="Model name sent in the body.")] = None,
    api_key: Annotated[
        str | None, typer.Option(help="Bearer token.", envvar="EMBEDPLEX_BENCH_API_KEY")
    ] = None,
    setup: Annotated[str, typer.Option(help="Label of the row in the table.")] = "embedplex",
    warmup: Annotated[
        int,
        typer.Option(
            help="Unmeasured requests first (with --repeat they also time how many new bodies "
            "to build before the run)."
        ),
    ] = 0,
    timeout: Annotated[float, typer.Option(help="Seconds before a request counts as failed.")] = (
        60.0
    ),
    refusal_pause_ms: Annotated[
        float, typer.Option(help="A worker's pause after a 429/503 before its next request.")
    ] = 0.0,
    repeat: Annotated[
        float | None,
        typer.Option(
            help="Repeated-text workload: this share (0-1) of inputs comes from a hot set, every "
            "other input is a text never sent before. Unset: 512 distinct bodies, cycled."
        ),
    ] = None,
    hot_set: Annotated[int, typer.Option(help="Texts in the hot set (with --repeat).")] = 256,
    seed: Annotated[
        int | None,
        typer.Option(
            help="Seed of the texts (default: a new random one, printed, so a run can be "
            "repeated); give each run against one cache its own."
        ),
    ] = None,
    strict: Annotated[
        bool,
        typer.Option(
            help="Exit 1 if any request failed or went unanswered (default: if none succeeded)."
        ),
    ] = False,
    json_out: Annotated[
        Path | None, typer.Option("--json", help="Write the result as JSON here ('-': stdout).")
    ] = None,
) -> None:
    """Closed-loop load against an embedding endpoint; prints the standard table. req/s
    counts successful (2xx) answers only. Exit status: 0; 1 when no request succeeded (with
    --strict: when any failed or was left unanswered); 2 when the server cannot be reached;
    130 on Ctrl-C, after the table of what was measured until then.
    """
    from embedplex.bench import checks, metrics
    from embedplex.bench.client import CannotConnectError
    from embedplex.bench.load import LoadInterrupted, LoadOptions, run_load_sync
    from embedplex.bench.progress import progress_bar
    from embedplex.bench.stats import load_table
    from embedplex.bench.workload import TokenSpec

    if requests is None and duration is None:
        requests = 1000
    if seed is None:
        seed = checks.new_seed()
    try:
        options = LoadOptions(
            url=url,
            dialect=dialect,
            requests=requests,
            duration=duration,
            concurrency=concurrency,
            tokens=TokenSpec.parse(tokens),
            inputs_per_request=inputs_per_request,
            model=model,
            api_key=api_key,
            setup=setup,
            warmup=warmup,
            timeout=timeout,
            refusal_pause=refusal_pause_ms / 1000,
            repeat=repeat,
            hot_set=hot_set,
            seed=seed,
        )
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from exc
    quiet = json_out is not None and str(json_out) == "-"
    before: dict[str, float] = {}
    interrupted = False
    try:
        with progress_bar(requests, duration, disable=quiet) as update:
            result = run_load_sync(
                options,
                progress=update,
                on_start=lambda: before.update(metrics.scrape(url, api_key=api_key)),
            )
    except CannotConnectError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(checks.EXIT_CANNOT_CONNECT) from None
    except LoadInterrupted as exc:
        result, interrupted = exc.result, True
    except KeyboardInterrupt:
        typer.echo("interrupted before the measured run began", err=True)
        raise typer.Exit(checks.EXIT_INTERRUPTED) from None
    counters = metrics.delta(before, metrics.scrape(url, api_key=api_key)) if before else {}
    shape = {"repeat": repeat, "hot_set": hot_set} if repeat is not None else {}
    extra = {"seed": seed, "counters": counters, "interrupted": interrupted}
    _emit(json_out, {**result.to_json(), **shape, **extra})
    if not quiet:
        typer.echo(load_table([result]))
        typer.echo(f"\nseed {seed} (--seed {seed} sends these texts again)")
        if counters:
            typer.echo(checks.counters_line(counters))
    warning = checks.cache_warning(repeat, counters)
    if warning:
        typer.echo(warning, err=True)
    if interrupted:
        typer.echo("interrupted: the figures above cover the run until Ctrl-C", err=True)
        raise typer.Exit(checks.EXIT_INTERRUPTED)
    status, why = checks.exit_status(result, strict=strict)
    if status:
        typer.echo(why, err=True)
        raise typer.Exit(status)


@bench_app.command("offline")
def offline(
    batch: Annotated[list[int] | None, typer.Option(help="Batch sizes (repeat the flag).")] = None,
    tokens: Annotated[
        list[str] | None, typer.Option(help="Lengths, N or LOW-HIGH (repeat).")
    ] = None,
    model_id: Annotated[str | None, typer.Option(help="Model (default: the server's).")] = None,
    backend: Annotated[str, typer.Option(help="onnx or torch.")] = "onnx",
    dtype: Annotated[str, typer.Option(help="float32, float16, int8.")] = "float32",
    streams: Annotated[
        int | None, typer.Option(help="Batches at once (default: the server's layout).")
    ] = None,
    threads: Annotated[
        int | None, typer.Option(help="Intra-op threads each (default: the server's layout).")
    ] = None,
    min_time: Annotated[float, typer.Option(help="Seconds per cell, at least.")] = 2.0,
    json_out: Annotated[
        Path | None, typer.Option("--json", help="Write the results as JSON here ('-': stdout).")
    ] = None,
) -> None:
    """Forward passes of the backend alone, in process, at the chosen batch sizes and lengths."""
    from embedplex.bench.models import load_local
    from embedplex.bench.offline import offline_table, run_offline
    from embedplex.bench.workload import TokenSpec

    overrides: dict[str, Any] = {"backend": backend, "dtype": dtype}
    if model_id:
        overrides["model_id"] = model_id
    if streams:
        overrides["inference_streams"] = streams
    if threads:
        overrides["inference_threads"] = threads
    overrides["inference_solo_threads"] = 1  # the layout alone: no session for lone passes
    tokenizer, engine, layout = load_local(**overrides)
    results = [
        run_offline(
            engine,
            tokenizer,
            tokens=TokenSpec.parse(t),
            batch=b,
            min_time=min_time,
            streams=layout.streams,
            threads=layout.threads,
        )
        for t in tokens or ["14"]
        for b in batch or [1, 8, 32]
    ]
    _emit(json_out, [r.to_json() for r in results])
    if not (json_out is not None and str(json_out) == "-"):
        typer.echo(offline_table(results))


@bench_app.command("suite")
def suite(
    out: Annotated[Path, typer.Option(help="Markdown report to write.")] = Path(
        "docs/benchmarks.md"
    ),
    quick: Annotated[bool, typer.Option(help="Short runs (a smoke test of the suite).")] = False,
    router_url: Annotated[
        str | None,
        typer.Option(
            help="An embedplex router whose upstream is the fp32 server (else one is started)."
        ),
    ] = None,
    soak_minutes: Annotated[
        float, typer.Option(help="Also soak the fp32 server with mixed load, RSS sampled.")
    ] = 0.0,
    server_port: Annotated[
        int | None, typer.Option(help="Port of the fp32 server (point the router at it).")
    ] = None,
) -> None:
    """The standard suite (``make bench``): offline ceiling, server, int8, writes the report."""
    from embedplex.bench.suite import SuiteOptions, run_suite

    run_suite(
        SuiteOptions(
            out=out,
            quick=quick,
            router_url=router_url,
            server_port=server_port,
            soak_s=soak_minutes * 60,
        )
    )


@bench_app.command("dedupe")
def dedupe(
    url: Annotated[str, typer.Option(help="Base URL (or full URL with a path).")] = (
        "http://127.0.0.1:8080"
    ),
    dialect: Annotated[str, typer.Option(help="openai (/v1/embeddings) or tei (/embed).")] = (
        "openai"
    ),
    callers: Annotated[int, typer.Option(help="Callers per round, one connection each.")] = 64,
    rounds: Annotated[int | None, typer.Option(help="Stop after this many rounds.")] = None,
    duration: Annotated[float | None, typer.Option(help="Stop after this many seconds.")] = None,
    distinct: Annotated[
        bool, typer.Option(help="Each caller its own text (the baseline: nothing to share).")
    ] = False,
    tokens: Annotated[str, typer.Option(help="Tokens per text: N or LOW-HIGH (uniform).")] = "14",
    model: Annotated[str | None, typer.Option(help="Model name sent in the body.")] = None,
    api_key: Annotated[
        str | None, typer.Option(help="Bearer token.", envvar="EMBEDPLEX_BENCH_API_KEY")
    ] = None,
    seed: Annotated[
        int | None, typer.Option(help="Seed of the texts (default: a new random one, printed).")
    ] = None,
    json_out: Annotated[
        Path | None, typer.Option("--json", help="Write the result as JSON here ('-': stdout).")
    ] = None,
) -> None:
    """Rounds of many callers sending one new identical text at once; reads dedupe counters.

    Exit status: 0; 1 when no request succeeded; 2 when the server cannot be reached.
    """
    from embedplex.bench import checks, metrics
    from embedplex.bench.client import CannotConnectError
    from embedplex.bench.dedupe import DedupeOptions, run_dedupe_sync
    from embedplex.bench.stats import load_table
    from embedplex.bench.workload import TokenSpec

    if rounds is None and duration is None:
        duration = 10.0
    if seed is None:
        seed = checks.new_seed()
    try:
        options = DedupeOptions(
            url=url,
            dialect=dialect,
            callers=callers,
            rounds=rounds,
            duration=duration,
            same_text=not distinct,
            tokens=TokenSpec.parse(tokens),
            model=model,
            api_key=api_key,
            seed=seed,
        )
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from exc
    before: dict[str, float] = {}
    try:
        result = run_dedupe_sync(
            options, on_start=lambda: before.update(metrics.scrape(url, api_key=api_key))
        )
    except CannotConnectError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(checks.EXIT_CANNOT_CONNECT) from None
    counters = metrics.delta(before, metrics.scrape(url, api_key=api_key))
    _emit(json_out, {**result.to_json(), "seed": seed, "counters": counters})
    if not (json_out is not None and str(json_out) == "-"):
        typer.echo(load_table([result]))
        typer.echo(f"\nseed {seed}; " + checks.counters_line(counters))
    status, why = checks.exit_status(result)
    if status:
        typer.echo(why, err=True)
        raise typer.Exit(status)


@bench_app.command("cache")
def cache(
    duration: Annotated[float, typer.Option(help="Seconds measured per run.")] = 15.0,
    concurrency: Annotated[int, typer.Option(help="Clients of the repeated-text load.")] = 64,
    tokens: Annotated[str, typer.Option(help="Tokens per text: N or LOW-HIGH.")] = "14",
    repeat: Annotated[
        list[float] | None, typer.Option(help="Repeat shares to run (repeat the flag).")
    ] = None,
    hot_set: Annotated[int, typer.Option(help="Texts in the hot set.")] = 256,
    rounds: Annotated[int, typer.Option(help="Rounds of every cell, the order alternated.")] = 2,
    callers: Annotated[int, typer.Option(help="Callers of the dedupe workload.")] = 64,
    cache_bytes: Annotated[int, typer.Option(help="--cache-max-bytes of the cache-on server.")] = 64
    * 1024
    * 1024,
    server_arg: Annotated[
        list[str] | None,
        typer.Option(help="A flag for both servers (repeat), e.g. --server-arg=--dtype=int8."),
    ] = None,
    json_out: Annotated[
        Path | None, typer.Option("--json", help="Write the results as JSON here ('-': stdout).")
    ] = None,
) -> None:
    """Two servers side by side, cache off and on: repeated texts at 0/30/90%, and dedupe."""
    from embedplex.bench.cache import CacheBenchOptions, cache_section, labelled, run_cache_bench
    from embedplex.bench.stats import load_table
    from embedplex.bench.workload import TokenSpec

    try:
        options = CacheBenchOptions(
            duration=duration,
            concurrency=concurrency,
            tokens=TokenSpec.parse(tokens),
            shares=tuple(repeat or (0.0, 0.3, 0.9)),
            hot_set=hot_set,
            rounds=rounds,
            callers=callers,
            cache_bytes=cache_bytes,
            server_args=tuple(server_arg or ()),
        )
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from exc
    data = run_cache_bench(
        options, on_run=lambda r: typer.echo(load_table([labelled(r)]), err=True)
    )
    _emit(json_out, data.to_json())
    if not (json_out is not None and str(json_out) == "-"):
        typer.echo(cache_section(data))
    if data.note:
        raise typer.Exit(1)


@bench_app.command("fairness")
def fairness(
    duration: Annotated[float, typer.Option(help="Seconds measured per side.")] = 20.0,
    warmup: Annotated[float, typer.Option(help="Seconds of unmeasured load first.")] = 3.0,
    bulk_concurrency: Annotated[int, typer.Option(help="The bulk key's concurrent requests.")] = 32,
    bulk_inputs: Annotated[int, typer.Option(help="Texts per bulk request.")] = 64,
    bulk_tokens: Annotated[str, typer.Option(help="Tokens per bulk text: N or LOW-HIGH.")] = (
        "16-64"
    ),
    query_rate: Annotated[float, typer.Option(help="The search key's queries per second.")] = (
        10.0
    ),
    query_tokens: Annotated[str, typer.Option(help="Tokens per query.")] = "14",
    server_arg: Annotated[
        list[str] | None,
        typer.Option(help="A flag for both servers (repeat), e.g. --server-arg=--model-id=X."),
    ] = None,
    json_out: Annotated[
        Path | None, typer.Option("--json", help="Write the results as JSON here ('-': stdout).")
    ] = None,
) -> None:
    """An interactive key beside a bulk key: fair queue against FIFO, two servers in turn."""
    from embedplex.bench.fairness import FairnessOptions, fairness_report, run_fairness
    from embedplex.bench.workload import TokenSpec

    try:
        options = FairnessOptions(
            duration=duration,
            warmup=warmup,
            bulk_concurrency=bulk_concurrency,
            bulk_inputs=bulk_inputs,
            bulk_tokens=TokenSpec.parse(bulk_tokens),
            query_rate=query_rate,
            query_tokens=TokenSpec.parse(query_tokens),
            server_args=tuple(server_arg or ()),
        )
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from exc
    sides = run_fairness(options)
    _emit(json_out, [s.to_json() for s in sides])
    if not (json_out is not None and str(json_out) == "-"):
        typer.echo(fairness_report(sides, options))


def _emit(path: Path | None, data: Any) -> None:
    if path is None:
        return
    text = json.dumps(data, indent=2)
    if str(path) == "-":
        sys.stdout.write(text + "\n")
    else:
        path.write_text(text + "\n")
