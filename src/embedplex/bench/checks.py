"""What a run's own figures say about the run, and the exit status the commands give for it.

A table of zeros is not a measurement: a run in which no request succeeded (a wrong path, a
wrong key, a server gone) exits 1; with ``--strict`` so does a run in which any request failed.
A workload meant to miss every cache (every text new with ``--repeat 0``, or the classic 512
cycled bodies, which a cache answers after the first 512) that the server's cache answered
anyway measures the cache, not the model: the run says so, from the server's own counters.
"""

from __future__ import annotations

import secrets

from embedplex.bench import metrics
from embedplex.bench.stats import LoadResult

EXIT_FAILED = 1
EXIT_CANNOT_CONNECT = 2
EXIT_INTERRUPTED = 130  # 128 + SIGINT, as a shell reports Ctrl-C


def new_seed() -> int:
    """A seed no earlier run is likely to have used: its texts are new to any cache."""
    return secrets.randbelow(2**31)


def exit_status(result: LoadResult, *, strict: bool = False) -> tuple[int, str]:
    """The exit status of a finished run, and why (empty when 0)."""
    if result.ok == 0:
        what = result.failure_note().partition(": ")[2] or "no request was sent"
        return EXIT_FAILED, f"error: no request succeeded ({what})"
    if strict and (result.fail or result.unfinished):
        # A request the server never answered (cut after the grace) failed all the same.
        failed = result.fail + result.unfinished
        return EXIT_FAILED, f"error: {failed:,} of {result.requests:,} requests failed"
    return 0, ""


def cache_warning(repeat: float | None, counters: dict[str, float]) -> str:
    """A warning when the server's cache answered a workload meant to miss (empty if not)."""
    hits = counters.get(metrics.HITS, 0.0)
    if hits <= 0 or (repeat is not None and repeat > 0):
        return ""
    if repeat is None:
        workload = "512 distinct bodies, cycled: after the first 512 every one is a repeat"
        cure = "--repeat 0 (every text new)"
    else:
        workload = "every text new (--repeat 0), but this seed's texts were sent before"
        cure = "a --seed no earlier run against this server used"
    return (
        f"warning: the server's cache answered {hits:,.0f} inputs of a workload meant to miss "
        f"({workload}): these figures measure the cache, not the model. Run the server with "
        f"--cache-max-bytes 0, or the load with {cure}."
    )


def counters_line(counters: dict[str, float]) -> str:
    """The server's cache and dedupe counters over the run, as one line."""
    shown = ", ".join(f"{k} +{v:,.0f}" for k, v in counters.items()) or "none exposed"
    return f"server counters: {shown}"
