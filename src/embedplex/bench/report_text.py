"""Markdown for docs/benchmarks.md, from one suite run."""

from __future__ import annotations

from typing import TYPE_CHECKING

from embedplex.backends.onnx import RUN_TOKENS
from embedplex.bench.cache import cache_section
from embedplex.bench.offline import offline_table
from embedplex.bench.stats import load_table, markdown_table

if TYPE_CHECKING:
    from embedplex.bench.report import SuiteData

_INTRO = """\
# Benchmarks

Written by `make bench` (`embedplex bench suite`); every figure below comes from one run of it,
side by side on the machine described. These machines are shared and noisy: read the **ratios**
(served vs offline, int8 vs fp32), not the absolute numbers.

The load generator (`embedplex bench load`) runs in its own process, closed loop: each of
`concurrency` workers holds one keep-alive connection and sends its next request as soon as the
answer to the last arrives. It shares the CPU with the server. Latencies are in milliseconds,
measured at the client; `fail` counts every non-2xx answer and connection error (429 and 503
listed under the table). `req/s` and `inputs/s` count successful (2xx) answers only, over the
run's time: from its start to the last request that finished. A timed run stops sending at its
duration; a request still open then gets a tenth of the duration (at least 1 s) to finish, and
is then cancelled and listed under the table as unfinished: one stuck request neither holds the
run to its timeout nor dilutes its rate.

`embedplex bench load` exits 1 when no request succeeded (with `--strict`, when any failed), 2
when the server cannot be reached, and 130 on Ctrl-C, after the table of what it measured until
then. Its texts come from a seed, a new random one unless `--seed` is given, printed under the
table and in the JSON. It reads the server's cache counters (`/metrics`) before and after the
run, reports them (`counters` in the JSON) and warns when the cache answered a workload meant to
miss: against a server with the cache on (the default), measure the model with `--repeat 0`
(every text new) and a seed no earlier run used, or start the server with `--cache-max-bytes 0`,
as every server of this suite is, the router's included.
"""


CACHE_HEADING = "## Embedding cache and in-flight dedupe (issue 16)"

CACHE_TEXT = """\
`embedplex bench cache` (the suite runs it last) starts two servers side by side, the same
model and flags, one with `--cache-max-bytes 0` and one with the cache on, and runs the same
load against both, the side that goes first alternating from cell to cell. Every other server
in this report runs with the cache off: the classic load cycles 512 distinct bodies, so with the
cache on every request after the 512th would be a hit.

**Repeated texts** (`embedplex bench load --repeat R --hot-set 256`): a share `R` of the inputs
(exactly: after `n` inputs, `floor(n R)` were hot) carries a text drawn uniformly, seeded, from
a hot set of 256; every other input is a text never sent before, warm-up included, so no cache
can answer it. Each cell has its own seed, so no text of one cell is sent again in another.
Before the warm-up each hot text is sent once, unmeasured: a run measures a cache that has seen
its hot set, as on a server that has been up a while, whatever the run's length. At 0% the
cache can only cost (a lookup and an insert per input); at 90% it answers nine inputs in ten.
The hot set is tiny against any cache bound and large against the 64 clients in flight, so
most repeats are cache hits, not joins of an identical input in flight; the dedupe column
counts the joins that still happen (on both sides: dedupe is always on).
A new text costs the client about 8 us to make and encode, so the load builds the bodies of a
run before it starts, in the seed's order ("Load generator ceiling" has the figures).

**Same text at once** (`embedplex bench dedupe`): 64 callers send one identical text at the same
moment, round after round, each round a new text: a cache cannot answer it, only dedupe (one
slot in the batch for all 64). The baseline is the same rounds with 64 distinct texts
(`--distinct`): the same load with nothing to share.

"""

CLIENT_BODIES = """\
New texts (`--repeat`, every text never sent before at `--repeat 0`) cost the client more than
cycled bodies: each new body is made (about 8 us: words drawn from the seed, JSON, the head).
The load builds them before the measured run, in the order the seed gives them: every body of a
`--requests` run; for a `--duration` run, 1.25 x what the warm-up's rate (workers / its median
latency) says the run sends (without a warm-up, 10,000; past them, the rest are made as sent).
The load generator's CPU per request inside the measured run (`examples/load_cpu.py`:
`getrusage`; 64 clients, 3 s after a 640-request warm-up; the code before and after, alternating,
three rounds; 2026-12-07, the 2-core machine at load average 0.3): against the echo server,
`--repeat 0` 21.0 / 21.0 / 20.3 us before, 10.8 / 10.2 / 10.2 us after (the 512 cycled bodies:
14.8 / 9.5 / 9.9 and 9.6 / 10.5 / 10.1 us); against a stub answering each request after 20 ms
(~2,950 req/s, the client is not the limit), 29.0 / 26.7 / 25.3 us before, 16.3 / 15.8 / 15.0 us
after (cycled: 17.7 / 16.8 / 18.0 and 15.7 / 16.0 / 17.9 us). A new text now costs the run what a
cycled body does.
"""


def render_markdown(
    d: SuiteData, machine: dict[str, str], targets: list[list[str]], png: str | None
) -> str:
    out = [_INTRO]
    if d.quick:
        out.append(
            "> **Quick run** (`--quick`): seconds per cell, a smoke test; not for quoting.\n"
        )
    out.append("## Machine\n")
    out += [f"- **{k}**: {v}" for k, v in machine.items()]
    out.append(f"- **suite wall time**: {d.total_s:.0f} s\n")

    out.append("## Targets (issue 3)\n")
    out.append(markdown_table(["target", "measured", "status"], targets) + "\n")

    out.append("## Offline ceiling: the backend alone, in process\n")
    out.append(
        "Collate + forward + pooling per batch. `layout` is streams x intra-op threads: `1x2` "
        "runs one batch at a time on both cores, `2x1` two batches at once from two threads "
        "with one core each (the server's default on this machine); the ceiling a target uses "
        "is the fastest row of any layout. "
        "The `5-256` row takes batches of 64 texts of random lengths, as 64 concurrent clients "
        "hand them to the server; a big batch is sorted by length and run in pieces of at most "
        f"{RUN_TOKENS:,} padded tokens, as the server's cost model cuts it. Each layout runs "
        "alone (the server's extra session for a pass with no other in flight is left out). "
        "The fp32 short and mixed cells run again in each side-by-side round and keep their "
        "fastest run: noise never lowers the ceiling the server is held to.\n"
    )
    out.append(offline_table(d.offline) + "\n")

    out.append("## Server: concurrency sweep (single 14-token text per request, OpenAI route)\n")
    if d.sweep:
        out.append(load_table(d.sweep) + "\n")
    if png:
        out.append(f"![throughput and p99 against concurrency]({png})\n")

    if d.rounds:
        out.append("### The target cells, run again side by side with the offline ceiling\n")
        out.append(
            "Each round runs the offline ceiling cells, then these against the same server; "
            "the targets use the best run of each cell, served and offline alike.\n"
        )
        out.append(load_table(d.rounds) + "\n")

    out.append("## Server: mixed lengths, TEI route, overload, int8\n")
    others = [r for r in (d.mixed, d.tei, d.int8_served, d.overload) if r is not None]
    if others:
        out.append(load_table(others) + "\n")
    out.append(
        "The overload row runs 128 clients against a server started with "
        "`--max-concurrent-requests 64`: the excess is refused at admission with 429; a refused "
        "client pauses 50 ms before its next request (`--refusal-pause-ms 50`), as a client "
        "honouring backoff would. Without the pause the refusals form a closed-loop storm that "
        "keeps the event loop saturated.\n"
    )

    out.append("## Direct vs through the router\n")
    if d.router is not None:
        pair = [r for r in (d.router_direct, d.router) if r is not None]
        out.append(load_table(pair) + "\n")
        if d.router_note:
            out.append(d.router_note + "\n")
    else:
        out.append(f"_{d.router_note}_\n")

    out.append(CACHE_HEADING + "\n")
    out.append(CACHE_TEXT)
    if d.cache is not None:
        out.append(cache_section(d.cache))
    else:
        out.append("_Not measured in this run._\n")

    out.append("## Memory, export and cold start\n")
    rows = [[s.dtype, s.attempt, f"{s.seconds:.1f}", f"`{s.command}`"] for s in d.starts]
    out.append(markdown_table(["dtype", "start", "process start to ready (s)", "command"], rows))
    out.append(
        "\nThe first start of each dtype runs with an empty cache directory: it exports the model "
        "to ONNX (int8: quantizes and checks quality against fp32), so first minus second is the "
        "export time. The second start reuses the cached export.\n"
    )
    if d.int8_cosine is not None:
        out.append(
            f"int8 (dynamic quantization, {d.int8_setting or 'weights'}): min cosine vs fp32 over "
            f"the calibration set = **{d.int8_cosine:.4f}** (the export is refused below "
            "`--int8-min-cosine`, 0.97 by default; settings are tried fastest first, see "
            "`INT8_SETTINGS` in `backends/onnx_export.py`).\n"
        )
    out.append(
        f"Server RSS: {d.rss_idle_mb:.0f} MB idle after start, {d.rss_after_mb:.0f} MB after the "
        f"load runs, {d.rss_peak_mb:.0f} MB peak (VmHWM).\n"
    )

    if d.soak:
        samples = ", ".join(f"{s // 60}:{s % 60:02d} {mb:.0f} MB" for s, mb, _ in d.soak)
        failed = sum(f for _, _, f in d.soak)
        out.append(
            f"Soak (mixed 5-256 at c=64, `--soak-minutes`): RSS {samples}; {failed} failed "
            "requests.\n"
        )

    out.append("## Load generator ceiling\n")
    if d.client_ceiling is not None:
        out.append(
            "The same load generator against a server that does no work (`python -m "
            "embedplex.bench.echo_server`): far above any served rate below, so the figures "
            "above measure the server, not the client.\n"
        )
        out.append(load_table([d.client_ceiling]) + "\n")
    out.append(CLIENT_BODIES)
    out.append(
        "Why not a stock client: measured once on this machine (2026-11-23) against the same echo "
        "server at concurrency 64, httpx 0.28 reached 130 req/s (6.9 ms of client CPU per "
        "request), aiohttp 3.14 7,383 req/s (113 us), and this client (pre-encoded requests, one "
        "keep-alive connection per worker, httptools parsing) 37,789 req/s (14 us). On two "
        "shared cores every microsecond the client spends is taken from the server.\n"
    )

    out.append("## Commands\n")
    soak = f" --soak-minutes {d.soak[-1][0] / 60:g}" if d.soak else ""
    make = f'make bench ARGS="{soak.strip()}"' if soak else "make bench"
    out.append(f"```sh\n{make}    # = embedplex bench suite --out docs/benchmarks.md{soak}")
    out += d.commands
    out.append("```\n")
    return "\n".join(out) + "\n"
