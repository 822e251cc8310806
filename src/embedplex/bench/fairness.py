"""``embedplex bench fairness``: an interactive key beside a bulk key, fair queue against FIFO.

Two servers are started one after the other (same model, same flags), one with
``queue_policy = fair`` and one with ``fifo``, each with two static keys (``[[api_keys]]`` from
``EMBEDPLEX_API_KEYS``, random secrets): ``bulk`` (priority batch) floods the server with
``bulk_concurrency`` closed-loop requests of ``bulk_inputs`` texts, while ``search``
(interactive) sends one short query every ``1 / query_rate`` seconds, open loop, each on a free
connection (a slow answer does not delay the next query). What it reports, side by side: the
interactive key's p50/p99 and the bulk key's throughput (inputs/s). docs/scheduling.md has the
figures and the target.

Both servers run with the embedding cache off (``--cache-max-bytes 0``) and every text, bulk
and query, is sent once (a seeded stream of new texts, the same on both sides): neither the
cache nor in-flight dedupe answers a key, so both sides compute every input they are sent.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from embedplex.bench.client import Connection
from embedplex.bench.load import NextBody, _Budget, _worker
from embedplex.bench.repeats import RepeatedBodies, RepeatedTexts, RequestMaker
from embedplex.bench.server_proc import ServerProcess
from embedplex.bench.stats import LoadResult, Outcomes, markdown_table
from embedplex.bench.workload import TokenSpec


@dataclass(frozen=True, kw_only=True)
class FairnessOptions:
    duration: float = 20.0  # seconds measured per side
    warmup: float = 3.0  # seconds of the same load first, unmeasured
    bulk_concurrency: int = 32
    bulk_inputs: int = 64
    bulk_tokens: TokenSpec = field(default_factory=lambda: TokenSpec(16, 64))
    query_rate: float = 10.0  # queries per second
    query_tokens: TokenSpec = field(default_factory=lambda: TokenSpec(14, 14))
    server_args: tuple[str, ...] = ()
    log_dir: Path = Path("bench-results")  # the servers' logs, as the suite's (git-ignored)

    def __post_init__(self) -> None:
        if self.duration <= 0 or self.warmup < 0 or self.query_rate <= 0:
            raise ValueError("duration and query rate must be positive, warmup >= 0")
        if self.bulk_concurrency < 1 or self.bulk_inputs < 1:
            raise ValueError("bulk concurrency and inputs must be at least 1")


@dataclass(frozen=True)
class Side:
    """One server's run: the interactive key's answers and the bulk key's."""

    policy: str
    search: LoadResult
    bulk: LoadResult

    def row(self) -> list[str]:
        s, b = self.search, self.bulk
        return [
            self.policy,
            f"{s.ok}",
            f"{s.fail}",
            f"{s.p50_ms:.1f}",
            f"{s.p99_ms:.1f}",
            f"{s.max_ms:.1f}",
            f"{b.inputs_per_s:.1f}",
            f"{b.p50_ms:.0f}",
            f"{b.fail}",
        ]

    def to_json(self) -> dict[str, Any]:
        return {"policy": self.policy, "search": self.search.to_json(), "bulk": self.bulk.to_json()}


HEADER = (
    "queue",
    "queries ok",
    "failed",
    "query p50 ms",
    "query p99 ms",
    "query max ms",
    "bulk inputs/s",
    "bulk p50 ms",
    "bulk failed",
)


def keys_env() -> tuple[dict[str, str], str, str]:
    """``EMBEDPLEX_API_KEYS`` with a fresh ``bulk`` (batch) and ``search`` key; and the two."""
    bulk, search = secrets.token_urlsafe(24), secrets.token_urlsafe(24)
    table = [
        {"id": "bulk", "key": bulk, "priority": "batch"},
        {"id": "search", "key": search, "priority": "interactive"},
    ]
    return {"EMBEDPLEX_API_KEYS": json.dumps(table)}, bulk, search


async def _queries(
    url: str, next_body: NextBody, rate: float, until: float, outcomes: Outcomes
) -> None:
    """Open loop: a query every ``1 / rate`` seconds, each on a connection not in use."""
    host, port = _host_port(url)
    idle: list[Connection] = []
    tasks: set[asyncio.Task[None]] = set()
    clock = time.perf_counter

    async def one(raw: bytes) -> None:
        conn = idle.pop() if idle else Connection(host, port)
        start = clock()
        try:
            status = await conn.request(raw, 60.0)
        except (TimeoutError, OSError) as exc:
            outcomes.error(type(exc).__name__)
            conn.close()
            return
        outcomes.record(status, clock() - start)
        idle.append(conn)

    n = 0
    next_at = clock()
    while next_at < until:
        await asyncio.sleep(max(0.0, next_at - clock()))
        task = asyncio.create_task(one(next_body()))
        tasks.add(task)
        task.add_done_callback(tasks.discard)
        n += 1
        next_at += 1 / rate
    if tasks:
        await asyncio.wait(tasks, timeout=65)
    for conn in idle:
        conn.close()


def _host_port(url: str) -> tuple[str, int]:
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    return parts.hostname or "127.0.0.1", parts.port or 80


async def run_side(url: str, options: FairnessOptions, bulk_key: str, search_key: str) -> Side:
    """The load against one running server (``policy`` is filled in by the caller)."""
    bulk_bodies = _new_texts(url, options.bulk_tokens, options.bulk_inputs, bulk_key, seed=1)
    query_bodies = _new_texts(url, options.query_tokens, 1, search_key, seed=2)
    host, port = _host_port(url)
    conns = [Connection(host, port) for _ in range(options.bulk_concurrency)]
    try:
        if options.warmup:
            end = time.perf_counter() + options.warmup
            warm = _Budget(None, end)
            await asyncio.gather(
                *(_worker(c, bulk_bodies, warm, Outcomes(), 60.0) for c in conns),
                _queries(url, query_bodies, options.query_rate, end, Outcomes()),
            )
        bulk, search = Outcomes(), Outcomes()
        start = time.perf_counter()
        until = start + options.duration
        budget = _Budget(None, until)
        await asyncio.gather(
            *(_worker(c, bulk_bodies, budget, bulk, 60.0) for c in conns),
            _queries(url, query_bodies, options.query_rate, until, search),
        )
        elapsed = time.perf_counter() - start
    finally:
        for c in conns:
            c.close()

    def summary(outcomes: Outcomes, setup: str, tokens: TokenSpec, n: int, c: int) -> LoadResult:
        return LoadResult.summarize(
            outcomes,
            setup=setup,
            url=url,
            dialect="openai",
            tokens=str(tokens),
            concurrency=c,
            inputs_per_request=n,
            elapsed_s=elapsed,
        )

    return Side(
        "",
        summary(search, "search", options.query_tokens, 1, 0),
        summary(bulk, "bulk", options.bulk_tokens, options.bulk_inputs, options.bulk_concurrency),
    )


def _new_texts(url: str, tokens: TokenSpec, inputs: int, key: str, *, seed: int) -> NextBody:
    """Request after request of ``inputs`` texts never sent before, under ``key``."""
    maker = RequestMaker(url, dialect="openai", model=None, api_key=key)
    return RepeatedBodies(RepeatedTexts(tokens, repeat=0.0, seed=seed), maker, inputs)


def run_fairness(options: FairnessOptions) -> list[Side]:
    """Both sides, one server at a time: ``fair`` first, then ``fifo``."""
    env, bulk_key, search_key = keys_env()
    sides = []
    for policy in ("fair", "fifo"):
        # The cache off (before the caller's flags, which may turn it back on).
        args = ["--queue-policy", policy, "--cache-max-bytes", "0", *options.server_args]
        log = options.log_dir / f"fairness-{policy}.log"
        with ServerProcess(args, log=log, env=env) as server:
            side = asyncio.run(run_side(server.url, options, bulk_key, search_key))
        sides.append(Side(policy, side.search, side.bulk))
    return sides


def fairness_report(sides: list[Side], options: FairnessOptions) -> str:
    """The table, the bulk key's throughput ratio, and the setup in one line."""
    lines = [markdown_table(HEADER, [s.row() for s in sides])]
    by = {s.policy: s for s in sides}
    if "fair" in by and "fifo" in by and by["fifo"].bulk.inputs_per_s > 0:
        ratio = by["fair"].bulk.inputs_per_s / by["fifo"].bulk.inputs_per_s
        lines.append(f"\nbulk throughput, fair / fifo: {ratio:.2f}x")
    lines.append(
        f"\nbulk key (priority batch): {options.bulk_concurrency} concurrent requests of "
        f"{options.bulk_inputs} texts of {options.bulk_tokens} tokens; search key (interactive): "
        f"{options.query_rate:g} queries/s of {options.query_tokens} tokens; "
        f"{options.duration:g} s measured per side after {options.warmup:g} s of warmup."
    )
    return "\n".join(lines)
