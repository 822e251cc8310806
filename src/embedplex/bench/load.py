"""``embedplex bench load``: closed-loop load against an embedding endpoint.

``concurrency`` workers each hold one keep-alive connection and send the next request as soon as
the previous answer arrives. A run stops after ``requests`` answers or ``duration`` seconds,
whichever comes first, and never runs past ``duration + timeout`` in any case. Without
``repeat`` the workers cycle 512 distinct pre-encoded bodies; with it, the repeated-text workload
of bench/repeats.py (what a cache is measured with).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from urllib.parse import urlsplit

from embedplex.bench.client import Connection
from embedplex.bench.repeats import (
    DEFAULT_HOT_SET,
    RepeatedBodies,
    RepeatedTexts,
    RequestMaker,
    check_repeat,
)
from embedplex.bench.stats import LoadResult, Outcomes
from embedplex.bench.workload import TokenSpec, build_requests

NextBody = Callable[[], bytes]

# Distinct request bodies per run: enough variety, little memory.
_MAX_BODIES = 512


@dataclass(frozen=True, kw_only=True)
class LoadOptions:
    """One load run. ``requests`` and ``duration`` bound it; at least one must be set."""

    url: str
    dialect: str = "openai"
    requests: int | None = None
    duration: float | None = None
    concurrency: int = 16
    tokens: TokenSpec = field(default_factory=lambda: TokenSpec(14, 14))
    inputs_per_request: int = 1
    model: str | None = None
    api_key: str | None = None
    setup: str = "embedplex"
    warmup: int = 0
    timeout: float = 60.0
    refusal_pause: float = 0.0  # seconds a worker waits after a 429 or 503, as a polite client
    seed: int = 0
    # None: the classic workload (``_MAX_BODIES`` distinct bodies, cycled). A share: the
    # repeated-text workload (bench/repeats.py), every other input a text never sent before.
    repeat: float | None = None
    hot_set: int = DEFAULT_HOT_SET

    def __post_init__(self) -> None:
        if self.dialect not in ("openai", "tei"):
            raise ValueError(f"dialect must be openai or tei, got {self.dialect!r}")
        if self.requests is None and self.duration is None:
            raise ValueError("give --requests or --duration (or both)")
        if self.requests is not None and self.requests < 1:
            raise ValueError("requests must be at least 1")
        if self.duration is not None and self.duration <= 0:
            raise ValueError("duration must be positive")
        if self.concurrency < 1 or self.inputs_per_request < 1:
            raise ValueError("concurrency and inputs-per-request must be at least 1")
        if self.repeat is not None:
            check_repeat(self.repeat, self.hot_set)
        parts = urlsplit(self.url)
        if parts.scheme != "http" or not parts.hostname:
            raise ValueError(f"url must be http://host:port[/path], got {self.url!r}")


class _Budget:
    """Hands out request slots until the count or the deadline runs out."""

    def __init__(self, count: int | None, deadline: float) -> None:
        self.left = count if count is not None else -1
        self.deadline = deadline

    def take(self) -> bool:
        if self.left == 0 or time.perf_counter() >= self.deadline:
            return False
        self.left -= 1
        return True


def cycled(bodies: Sequence[bytes], offset: int) -> NextBody:
    """``bodies`` from ``offset`` on, round and round."""
    return itertools.islice(itertools.cycle(bodies), offset % len(bodies), None).__next__


async def _worker(
    conn: Connection,
    next_body: NextBody,
    budget: _Budget,
    outcomes: Outcomes,
    limit_s: float,
    pause_s: float = 0.0,
) -> None:
    clock = time.perf_counter
    while budget.take():
        raw = next_body()
        start = clock()
        try:
            status = await conn.request(raw, limit_s)
        except TimeoutError:
            outcomes.error("timeout")
            conn.close()
            continue
        except OSError as exc:
            outcomes.error(type(exc).__name__)
            conn.close()
            await asyncio.sleep(0.01)  # a refusing server must not turn this into a busy loop
            continue
        outcomes.record(status, clock() - start)
        if pause_s and status in (429, 503):
            await asyncio.sleep(pause_s)


async def run_load(
    options: LoadOptions,
    *,
    progress: Callable[[int, float], None] | None = None,
    on_start: Callable[[], None] | None = None,
) -> LoadResult:
    """Run the load; ``progress(done, elapsed_s)`` is called about five times a second, and
    ``on_start()`` once, after the warm-up, as the measured run begins."""
    parts = urlsplit(options.url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 80
    work = workload(options)
    source = work.bodies
    conns = [Connection(host, port) for _ in range(options.concurrency)]
    try:
        await asyncio.gather(*(c.connect() for c in conns))
        if work.priming:
            primed = _Budget(len(work.priming), time.perf_counter() + options.timeout)
            shared = iter(work.priming).__next__
            await asyncio.gather(
                *(_worker(c, shared, primed, Outcomes(), options.timeout) for c in conns)
            )
        if options.warmup:
            warm = _Budget(options.warmup, time.perf_counter() + options.timeout)
            await asyncio.gather(
                *(
                    _worker(c, source(k), warm, Outcomes(), options.timeout)
                    for k, c in enumerate(conns)
                )
            )
        if on_start is not None:
            on_start()
        return await _measure(options, conns, source, progress)
    finally:
        for c in conns:
            c.close()


@dataclass(frozen=True)
class Workload:
    """Where each worker's request bytes come from (by its offset), and what is sent once
    before the warm-up, unmeasured."""

    bodies: Callable[[int], NextBody]
    priming: list[bytes]


def workload(options: LoadOptions) -> Workload:
    """The classic workload gives each worker its own walk through one list of bodies.

    The repeated-text workload gives every worker the same stream, so no fresh text is sent
    twice, and primes the run with each hot text once: a run then measures a cache that has
    seen its hot set, whatever the run's length, as a server that has been up a while would.
    """
    if options.repeat is not None:
        shared = RepeatedBodies(
            RepeatedTexts(
                options.tokens, repeat=options.repeat, hot_set=options.hot_set, seed=options.seed
            ),
            RequestMaker(
                options.url, dialect=options.dialect, model=options.model, api_key=options.api_key
            ),
            options.inputs_per_request,
        )
        return Workload(lambda _offset: shared, shared.priming())
    count = min(options.requests or _MAX_BODIES, _MAX_BODIES)
    bodies = build_requests(
        options.url,
        dialect=options.dialect,
        tokens=options.tokens,
        inputs_per_request=options.inputs_per_request,
        model=options.model,
        count=count,
        api_key=options.api_key,
        seed=options.seed,
    )
    return Workload(lambda offset: cycled(bodies, offset), [])


async def _measure(
    options: LoadOptions,
    conns: list[Connection],
    source: Callable[[int], NextBody],
    progress: Callable[[int, float], None] | None,
) -> LoadResult:
    outcomes = Outcomes()
    start = time.perf_counter()
    limit = options.duration if options.duration is not None else 24 * 3600.0
    budget = _Budget(options.requests, start + limit)
    workers = [
        asyncio.create_task(
            _worker(c, source(k * 7), budget, outcomes, options.timeout, options.refusal_pause)
        )
        for k, c in enumerate(conns)
    ]
    ticker = asyncio.create_task(_tick(outcomes, start, progress)) if progress else None
    try:
        # Each worker stops taking new requests at the deadline, and an open request ends
        # within ``timeout``; the outer bound is a last resort against a wedged loop.
        await asyncio.wait_for(asyncio.gather(*workers), limit + options.timeout + 5)
    finally:
        for task in workers:
            task.cancel()
        if ticker is not None:
            ticker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await ticker
    elapsed = time.perf_counter() - start
    if progress:
        progress(outcomes.done, elapsed)
    return LoadResult.summarize(
        outcomes,
        setup=options.setup,
        url=options.url,
        dialect=options.dialect,
        tokens=str(options.tokens),
        concurrency=options.concurrency,
        inputs_per_request=options.inputs_per_request,
        elapsed_s=elapsed,
    )


async def _tick(outcomes: Outcomes, start: float, progress: Callable[[int, float], None]) -> None:
    while True:
        await asyncio.sleep(0.2)
        progress(outcomes.done, time.perf_counter() - start)


def run_load_sync(
    options: LoadOptions,
    *,
    progress: Callable[[int, float], None] | None = None,
    on_start: Callable[[], None] | None = None,
) -> LoadResult:
    """``run_load`` on a fresh event loop (uvloop when installed)."""
    run = run_load(options, progress=progress, on_start=on_start)
    try:
        import uvloop
    except ImportError:
        return asyncio.run(run)
    return uvloop.run(run)
