"""Per-check latency of the two ways to share rate limits through Redis (docs/limits.md).

    pip install limits   # only for this comparison: embedplex does not depend on it
    PYTHONPATH=src python examples/ratelimit_latency.py [--url redis://HOST:6379/0] [--checks N]

A "check" is what admitting one request costs: requests-per-minute taken, tokens-per-minute
tested, and the numbers the x-ratelimit-* headers need. Measured sequentially on one connection
(the latency one request waits), with redis-py's asyncio client in both cases:

- lua: embedplex's script (``embedplex.limits.redis_store``), rpm + tpm + concurrency in one call;
- limits-moving / limits-fixed: the ``limits`` library's async strategies, one call per limit
  (hit rpm, test tpm, window stats of both); and the rpm hit alone, its floor.

Also the charge after a request (50 tokens): one script call vs. ``hit(tpm, cost=50)``.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
import uuid
from collections.abc import Awaitable, Callable

from limits import RateLimitItemPerMinute
from limits.aio.storage import RedisStorage
from limits.aio.strategies import FixedWindowRateLimiter, MovingWindowRateLimiter
from redis.asyncio import Redis

from embedplex.core.tenant import KeyLimits
from embedplex.limits.redis_store import RedisLimits


async def timed(name: str, checks: int, check: Callable[[int], Awaitable[object]]) -> None:
    for i in range(50):  # warm up: connections, script cache
        await check(i)
    samples = []
    for i in range(checks):
        t0 = time.perf_counter()
        await check(i)
        samples.append((time.perf_counter() - t0) * 1e6)
    samples.sort()
    p50 = statistics.median(samples)
    p99 = samples[int(len(samples) * 0.99) - 1]
    mean = statistics.fmean(samples)
    print(f"{name:34s} p50 {p50:7.1f} us   p99 {p99:7.1f} us   mean {mean:7.1f} us")


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--url", default="redis://127.0.0.1:6379/0")
    parser.add_argument("--checks", type=int, default=2000)
    args = parser.parse_args()
    n = args.checks
    run = uuid.uuid4().hex[:8]  # fresh keys each run
    big = 10**9  # limits never reached: we time the checks, not refusals

    client = Redis.from_url(args.url)
    lua = RedisLimits(client)
    limits = KeyLimits(rpm=big, tpm=big, max_concurrent=big)
    await timed(
        "lua admit (rpm+tpm+concurrency)", n, lambda i: lua.admit(f"{run}-a", limits, str(i))
    )
    await timed(
        "lua finish (release + 50 tokens)", n, lambda i: lua.finish(f"{run}-a", limits, str(i), 50)
    )
    rpm_only = KeyLimits(rpm=big)
    await timed("lua admit (rpm only)", n, lambda i: lua.admit(f"{run}-b", rpm_only, str(i)))
    await client.aclose()

    storage = RedisStorage(f"async+{args.url}", implementation="redispy")
    rpm, tpm = RateLimitItemPerMinute(big), RateLimitItemPerMinute(big)
    for label, strategy in (
        ("moving", MovingWindowRateLimiter(storage)),
        ("fixed", FixedWindowRateLimiter(storage)),
    ):
        key = f"{run}-{label}"

        async def check(i: int, s=strategy, key=key) -> object:
            await s.hit(rpm, key, "r")
            await s.test(tpm, key, "t")
            return (
                await s.get_window_stats(rpm, key, "r"),
                await s.get_window_stats(tpm, key, "t"),
            )

        await timed(f"limits-{label} (hit+test+2 stats)", n, check)
        await timed(
            f"limits-{label} (rpm hit alone)",
            n,
            lambda i, s=strategy, key=key: s.hit(rpm, key, "x"),
        )
        await timed(
            f"limits-{label} (charge 50 tokens)",
            n,
            lambda i, s=strategy, key=key: s.hit(tpm, key, "t", cost=50),
        )
    await storage.reset()


if __name__ == "__main__":
    asyncio.run(main())
