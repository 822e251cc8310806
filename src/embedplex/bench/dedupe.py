"""``embedplex bench dedupe``: many callers send one text at the same moment, round after round.

Each round every caller (one keep-alive connection each) writes its request in the same turn of
the event loop, and the next round starts when all have answered. With ``same_text`` every
caller of a round sends one identical text; each round's text is new (never sent before in the
run), so a cache cannot answer it and only in-flight dedupe can save work. Without it, every
caller sends a text of its own: the same shape of load with nothing to share, the baseline the
dedupe figure is read against.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from urllib.parse import urlsplit

from embedplex.bench.client import Connection, connect_all
from embedplex.bench.load import run_loop
from embedplex.bench.repeats import FreshTexts, RequestMaker
from embedplex.bench.stats import LoadResult, Outcomes
from embedplex.bench.workload import TokenSpec


@dataclass(frozen=True, kw_only=True)
class DedupeOptions:
    """One run. ``rounds`` and ``duration`` bound it; at least one must be set."""

    url: str
    dialect: str = "openai"
    callers: int = 64
    rounds: int | None = None
    duration: float | None = None
    same_text: bool = True
    tokens: TokenSpec = field(default_factory=lambda: TokenSpec(14, 14))
    model: str | None = None
    api_key: str | None = None
    setup: str = ""
    warmup_rounds: int = 2
    timeout: float = 60.0
    seed: int = 0

    def __post_init__(self) -> None:
        if self.dialect not in ("openai", "tei"):
            raise ValueError(f"dialect must be openai or tei, got {self.dialect!r}")
        if self.rounds is None and self.duration is None:
            raise ValueError("give --rounds or --duration (or both)")
        if self.rounds is not None and self.rounds < 1:
            raise ValueError("rounds must be at least 1")
        if self.duration is not None and self.duration <= 0:
            raise ValueError("duration must be positive")
        if self.callers < 1 or self.warmup_rounds < 0:
            raise ValueError("callers must be at least 1 and warmup rounds at least 0")
        parts = urlsplit(self.url)
        if parts.scheme != "http" or not parts.hostname:
            raise ValueError(f"url must be http://host:port[/path], got {self.url!r}")

    @property
    def label(self) -> str:
        shape = "same text" if self.same_text else "distinct texts"
        return self.setup or f"{shape} x{self.callers}"


class RoundBodies:
    """Each call: one round's requests, one per caller, of texts never handed out before."""

    def __init__(self, options: DedupeOptions) -> None:
        self._texts = FreshTexts(options.tokens, seed=options.seed)
        self._maker = RequestMaker(
            options.url, dialect=options.dialect, model=options.model, api_key=options.api_key
        )
        self._callers = options.callers
        self._same = options.same_text

    def __call__(self) -> list[bytes]:
        if self._same:
            return [self._maker([self._texts()])] * self._callers
        return [self._maker([self._texts()]) for _ in range(self._callers)]


async def _send(conn: Connection, raw: bytes, outcomes: Outcomes, limit_s: float) -> None:
    start = time.perf_counter()
    try:
        status = await conn.request(raw, limit_s)
    except TimeoutError:
        outcomes.error("timeout")
        conn.close()
        return
    except OSError as exc:
        outcomes.error(type(exc).__name__)
        conn.close()
        return
    outcomes.record(status, time.perf_counter() - start)


async def _rounds(
    conns: list[Connection],
    bodies: RoundBodies,
    outcomes: Outcomes,
    *,
    rounds: int | None,
    until: float,
    limit_s: float,
) -> None:
    done = 0
    while (rounds is None or done < rounds) and time.perf_counter() < until:
        await asyncio.gather(
            *(_send(c, raw, outcomes, limit_s) for c, raw in zip(conns, bodies(), strict=True))
        )
        done += 1


async def run_dedupe(
    options: DedupeOptions, *, on_start: Callable[[], None] | None = None
) -> LoadResult:
    """Warm-up rounds, then measured rounds until ``rounds`` or ``duration`` runs out;
    ``on_start()`` is called once as the measured rounds begin."""
    parts = urlsplit(options.url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 80
    bodies = RoundBodies(options)
    conns = [Connection(host, port) for _ in range(options.callers)]
    try:
        await connect_all(conns, options.url)
        if options.warmup_rounds:
            await _rounds(
                conns,
                bodies,
                Outcomes(),
                rounds=options.warmup_rounds,
                until=time.perf_counter() + options.timeout,
                limit_s=options.timeout,
            )
        if on_start is not None:
            on_start()
        outcomes = Outcomes()
        start = time.perf_counter()
        limit = options.duration if options.duration is not None else 24 * 3600.0
        # A round ends within ``timeout`` of its start; the outer bound is a last resort.
        await asyncio.wait_for(
            _rounds(
                conns,
                bodies,
                outcomes,
                rounds=options.rounds,
                until=start + limit,
                limit_s=options.timeout,
            ),
            limit + options.timeout + 5,
        )
        elapsed = time.perf_counter() - start
    finally:
        for c in conns:
            c.close()
    return LoadResult.summarize(
        outcomes,
        setup=options.label,
        url=options.url,
        dialect=options.dialect,
        tokens=str(options.tokens),
        concurrency=options.callers,
        inputs_per_request=1,
        elapsed_s=elapsed,
    )


def run_dedupe_sync(
    options: DedupeOptions, *, on_start: Callable[[], None] | None = None
) -> LoadResult:
    """``run_dedupe`` on a fresh event loop (uvloop when installed)."""
    return run_loop(run_dedupe(options, on_start=on_start))
