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
    duration: Annotated[float | None, typer.Option(help="Stop after this many seconds.")] = None,
    concurrency: Annotated[int, typer.Option(help="Workers, one connection each.")] = 16,
    tokens: Annotated[str, typer.Option(help="Tokens per input: N or LOW-HIGH (uniform).")] = "14",
    inputs_per_request: Annotated[int, typer.Option(help="Texts per request.")] = 1,
    model: Annotated[str | None, typer.Option(help="Model name sent in the body.")] = None,
    api_key: Annotated[
        str | None, typer.Option(help="Bearer token.", envvar="EMBEDPLEX_BENCH_API_KEY")
    ] = None,
    setup: Annotated[str, typer.Option(help="Label of the row in the table.")] = "embedplex",
    warmup: Annotated[int, typer.Option(help="Unmeasured requests first.")] = 0,
    timeout: Annotated[float, typer.Option(help="Seconds before a request counts as failed.")] = (
        60.0
    ),
    refusal_pause_ms: Annotated[
        float, typer.Option(help="A worker's pause after a 429/503 before its next request.")
    ] = 0.0,
    json_out: Annotated[
        Path | None, typer.Option("--json", help="Write the result as JSON here ('-': stdout).")
    ] = None,
) -> None:
    """Closed-loop load against an embedding endpoint; prints the standard table."""
    from embedplex.bench.load import LoadOptions, run_load_sync
    from embedplex.bench.progress import progress_bar
    from embedplex.bench.stats import load_table
    from embedplex.bench.workload import TokenSpec

    if requests is None and duration is None:
        requests = 1000
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
        )
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from exc
    quiet = json_out is not None and str(json_out) == "-"
    with progress_bar(requests, duration, disable=quiet) as update:
        result = run_load_sync(options, progress=update)
    _emit(json_out, result.to_json())
    if not quiet:
        typer.echo(load_table([result]))


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
