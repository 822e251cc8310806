"""``embedplex bench load``: closed-loop load against an embedding endpoint.

``concurrency`` workers each hold one keep-alive connection and send the next request as soon as
the previous answer arrives. A run stops taking new requests after ``requests`` of them or at
``duration`` seconds, whichever comes first. Past the duration, a request still open gets a
grace (``grace_s``: a tenth of the duration, at least 1 s) to finish; then it is cancelled and
counted as unfinished, so one stuck request cannot stretch the run to its timeout. The run's
time is from its start to the last request that finished (answered or failed). Without
``repeat`` the workers cycle 512 distinct pre-encoded bodies; with it, the repeated-text
workload of bench/repeats.py (what a cache is measured with), its bodies built before the run.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import math
import time
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar
from urllib.parse import urlsplit

from embedplex.bench.client import Connection, connect_all
from embedplex.bench.repeats import (
    DEFAULT_HOT_SET,
    RepeatedBodies,
    RepeatedTexts,
    RequestMaker,
    check_repeat,
)
from embedplex.bench.stats import LoadResult, Outcomes, percentile
from embedplex.bench.workload import TokenSpec, build_requests

NextBody = Callable[[], bytes]
T = TypeVar("T")

# Distinct request bodies per run: enough variety, little memory.
_MAX_BODIES = 512

# A request still open at the end of a timed run gets this share of the duration to finish (at
# least _MIN_GRACE_S) before it is cancelled and counted as unfinished.
_GRACE_SHARE = 0.1
_MIN_GRACE_S = 1.0

# The repeated-text workload's bodies built ahead (``pool_size``): so many for a timed run with
# no warm-up to time, the margin over what the warm-up's rate says, and the memory they may take.
_POOL_UNTIMED = 10_000
_POOL_SLACK = 1.25
_POOL_MAX_BYTES = 256 * 1024 * 1024


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
        try:
            port = parts.port  # "8080x" raises here, not in the middle of the run
        except ValueError:
            port = -1
        if parts.scheme != "http" or not parts.hostname or port == -1:
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
            outcomes.last_at = clock()
            continue
        except OSError as exc:
            outcomes.error(type(exc).__name__)
            conn.close()
            outcomes.last_at = clock()
            await asyncio.sleep(0.01)  # a refusing server must not turn this into a busy loop
            continue
        except asyncio.CancelledError:
            outcomes.unfinished += 1  # the run ended, or was stopped, with this request open
            conn.close()
            raise
        now = clock()
        outcomes.record(status, now - start)
        outcomes.last_at = now
        if pause_s and status in (429, 503):
            await asyncio.sleep(pause_s)


async def _drive(tasks: list[asyncio.Task[None]], stop_after: float | None = None) -> None:
    """Wait for the workers ``tasks`` (at most ``stop_after`` s); then, or when one fails or
    this is cancelled, cancel those still running and await every one; a worker's error is
    raised."""
    try:
        await asyncio.wait(tasks, timeout=stop_after, return_when=asyncio.FIRST_EXCEPTION)
    finally:
        for task in tasks:
            task.cancel()
        results = await asyncio.gather(*tasks, return_exceptions=True)
    for result in results:
        if isinstance(result, Exception):
            raise result


def _spawn(
    conns: list[Connection],
    body: Callable[[int], NextBody],
    budget: _Budget,
    outcomes: Outcomes,
    *,
    timeout: float,
) -> list[asyncio.Task[None]]:
    """Unmeasured workers (priming, warm-up): worker ``k`` takes its bodies from ``body(k)``."""
    return [
        asyncio.create_task(_worker(c, body(k), budget, outcomes, timeout))
        for k, c in enumerate(conns)
    ]


def grace_s(options: LoadOptions) -> float:
    """How long a request still open at the end of a timed run may take to finish."""
    if options.duration is None:
        return 0.0
    return max(_MIN_GRACE_S, options.duration * _GRACE_SHARE)


def pool_size(options: LoadOptions, warm: Outcomes | None) -> int:
    """Bodies of the repeated-text workload to build before the run: every one a run of
    ``requests`` sends; for a timed run, what the warm-up's answers say it sends with a quarter
    more (closed loop: workers / median latency requests a second), plus one per worker, or
    ``_POOL_UNTIMED`` without a warm-up. A run that outlasts them builds the rest as it sends
    them; only the building in the run costs the server CPU, the building before it does not."""
    if options.duration is None:
        return options.requests or 0
    latency = percentile(warm.ok, 50) if warm is not None and warm.ok else math.nan
    if latency > 0:
        rate = options.concurrency / latency
        guess = math.ceil(_POOL_SLACK * rate * options.duration) + options.concurrency
    else:
        guess = _POOL_UNTIMED
    return guess if options.requests is None else min(options.requests, guess)


async def run_load(
    options: LoadOptions,
    *,
    progress: Callable[[int, float], None] | None = None,
    on_start: Callable[[], None] | None = None,
    on_interrupt: Callable[[LoadResult], None] | None = None,
) -> LoadResult:
    """Run the load; ``progress(done, elapsed_s)`` is called about five times a second, and
    ``on_start()`` once, after the warm-up, as the measured run begins.

    A server that refuses the first connections raises ``CannotConnectError``. Cancelled
    during the measured run (Ctrl-C), the run stops its workers, hands what it measured so far
    to ``on_interrupt`` and lets the cancellation go on.
    """
    parts = urlsplit(options.url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 80
    work = workload(options)
    source = work.bodies
    conns = [Connection(host, port) for _ in range(options.concurrency)]
    try:
        await connect_all(conns, options.url)
        if work.priming:
            primed = _Budget(len(work.priming), time.perf_counter() + options.timeout)
            shared = iter(work.priming).__next__
            await _drive(
                _spawn(conns, lambda _k: shared, primed, Outcomes(), timeout=options.timeout)
            )
        warm = None
        if options.warmup:
            if work.prebuild is not None:  # the warm-up's rate is then the run's
                work.prebuild(options.warmup)
            budget = _Budget(options.warmup, time.perf_counter() + options.timeout)
            warm = Outcomes()
            await _drive(_spawn(conns, source, budget, warm, timeout=options.timeout))
        if work.prebuild is not None:
            work.prebuild(pool_size(options, warm))
        if on_start is not None:
            on_start()
        return await _measure(options, conns, source, progress, on_interrupt)
    finally:
        for c in conns:
            c.close()


@dataclass(frozen=True)
class Workload:
    """Where each worker's request bytes come from (by its offset), and what is sent once
    before the warm-up, unmeasured."""

    bodies: Callable[[int], NextBody]
    priming: list[bytes]
    # Builds the next n bodies ahead of the run (the repeated-text workload); None: nothing to.
    prebuild: Callable[[int], int] | None = None


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
        return Workload(
            lambda _offset: shared,
            shared.priming(),
            lambda n: shared.prebuild(n, max_bytes=_POOL_MAX_BYTES),
        )
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
    on_interrupt: Callable[[LoadResult], None] | None,
) -> LoadResult:
    outcomes = Outcomes()
    start = time.perf_counter()
    duration = options.duration
    budget = _Budget(options.requests, math.inf if duration is None else start + duration)
    workers = [
        asyncio.create_task(
            _worker(c, source(k * 7), budget, outcomes, options.timeout, options.refusal_pause)
        )
        for k, c in enumerate(conns)
    ]
    ticker = asyncio.create_task(_tick(outcomes, start, progress)) if progress else None

    def summary() -> LoadResult:
        # From the start to the last request that finished; unfinished ones do not count.
        end = outcomes.last_at or time.perf_counter()
        return LoadResult.summarize(
            outcomes,
            setup=options.setup,
            url=options.url,
            dialect=options.dialect,
            tokens=str(options.tokens),
            concurrency=options.concurrency,
            inputs_per_request=options.inputs_per_request,
            elapsed_s=end - start,
        )

    try:
        # A timed run: workers stop taking requests at the deadline; those still open after
        # the grace are cancelled (counted unfinished). A counted run: each request ends within
        # ``timeout``.
        await _drive(workers, None if duration is None else duration + grace_s(options))
    except asyncio.CancelledError:
        if on_interrupt is not None:
            on_interrupt(summary())
        raise
    finally:
        if ticker is not None:
            ticker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await ticker
    result = summary()
    if progress:
        progress(outcomes.done, result.elapsed_s)
    return result


async def _tick(outcomes: Outcomes, start: float, progress: Callable[[int, float], None]) -> None:
    while True:
        await asyncio.sleep(0.2)
        progress(outcomes.done, time.perf_counter() - start)


class LoadInterrupted(KeyboardInterrupt):
    """Ctrl-C during the measured run; ``result`` is what was measured until then."""

    def __init__(self, result: LoadResult) -> None:
        super().__init__("load interrupted")
        self.result = result


def run_load_sync(
    options: LoadOptions,
    *,
    progress: Callable[[int, float], None] | None = None,
    on_start: Callable[[], None] | None = None,
) -> LoadResult:
    """``run_load`` on a fresh event loop (uvloop when installed).

    Ctrl-C during the measured run raises ``LoadInterrupted`` (a ``KeyboardInterrupt``) with
    the partial result, once every worker has stopped; before it, a plain ``KeyboardInterrupt``.
    """
    partial: list[LoadResult] = []
    run = run_load(options, progress=progress, on_start=on_start, on_interrupt=partial.append)
    try:
        return run_loop(run)
    except KeyboardInterrupt as exc:
        if partial:
            raise LoadInterrupted(partial[0]) from exc
        raise


def run_loop(main: Coroutine[Any, Any, T]) -> T:
    """``main`` on a fresh event loop: uvloop when installed, asyncio's otherwise."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(main)
    return uvloop.run(main)
