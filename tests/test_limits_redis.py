"""Limits shared through a Redis the test starts itself: two apps limited once, Redis stopped
and restarted mid-test (per-process limits meanwhile, one log line, the metric), shared again."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import time
from collections.abc import AsyncIterator, Coroutine, Iterator
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
import redis.asyncio

from embedplex.backends.fake import FakeBackend
from embedplex.core.tenant import KeyLimits
from embedplex.limits import Lease, RateLimiter, RedisLimits
from helpers import eventually, parse_metrics, running, value
from redis_server import NO_REDIS_SERVER, REDIS_SERVER, RedisServer, redis_server
from tenants import limited_app

pytestmark = pytest.mark.skipif(REDIS_SERVER is None, reason=NO_REDIS_SERVER)

KEYS = {name: KeyLimits(rpm=3) for name in ("before", "during", "after")}
KEYS["burst"] = KeyLimits(tpm=1000)


@pytest.fixture
def server() -> Iterator[RedisServer]:
    with redis_server() as srv:
        yield srv


@pytest.fixture
async def replicas(
    tiny_model_dir: Path, server: RedisServer
) -> AsyncIterator[list[tuple[httpx.AsyncClient, RateLimiter]]]:
    """Two apps (two replicas, each with its own limiter) on the one Redis."""
    async with AsyncExitStack() as stack:
        out = []
        for _ in range(2):
            app = limited_app(
                tiny_model_dir,
                FakeBackend(),
                KEYS,
                redis_url=server.url,
                redis_probe_interval_s=0.2,
            )
            client = await stack.enter_async_context(running(app))
            out.append((client, app.state.rate_limiter))
        yield out


async def statuses(client: httpx.AsyncClient, key: str, n: int) -> list[int]:
    out = []
    for _ in range(n):
        r = await client.post(
            "/v1/embeddings", json={"input": "hi"}, headers={"x-test-tenant": key}
        )
        out.append(r.status_code)
    return out


async def backend_gauge(client: httpx.AsyncClient) -> tuple[float, float, float]:
    m = parse_metrics((await client.get("/metrics")).text)
    return (
        value(m, "embedplex_rate_limit_backend", backend="redis"),
        value(m, "embedplex_rate_limit_backend", backend="local"),
        value(m, "embedplex_rate_limit_fallbacks_total"),
    )


async def test_shared_then_per_process_while_redis_is_away_then_shared_again(
    replicas: list[tuple[httpx.AsyncClient, RateLimiter]],
    server: RedisServer,
    caplog: pytest.LogCaptureFixture,
) -> None:
    (a, lim_a), (b, lim_b) = replicas
    caplog.set_level(logging.INFO, logger="embedplex.limits")
    # Shared: 3 a minute across both replicas, whichever serves them.
    assert await statuses(a, "before", 2) + await statuses(b, "before", 2) == [200, 200, 200, 429]
    assert await backend_gauge(a) == (1.0, 0.0, 0.0)
    keys = redis.Redis(port=server.port).keys("embedplex:rl:*")
    assert b"embedplex:rl:{before}" in keys

    server.stop()
    # Limited per process: each replica admits the key's 3 alone, then refuses.
    assert await statuses(a, "during", 4) == [200, 200, 200, 429]
    assert await statuses(b, "during", 4) == [200, 200, 200, 429]
    assert (lim_a.backend, lim_b.backend) == ("local", "local")
    assert await backend_gauge(a) == (0.0, 1.0, 1.0)
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 2  # one line per replica, not one per request
    assert all("limiting per process" in r.getMessage() for r in warnings)

    server.start()  # the same port, empty (no persistence)
    await eventually(lambda: lim_a.backend == "redis" and lim_b.backend == "redis", 20)
    assert await backend_gauge(b) == (1.0, 0.0, 1.0)
    assert sum("Redis is back" in r.getMessage() for r in caplog.records) == 2
    assert await statuses(b, "after", 2) + await statuses(a, "after", 2) == [200, 200, 200, 429]


async def test_a_burst_across_replicas_is_held_to_tokens_per_minute(
    replicas: list[tuple[httpx.AsyncClient, RateLimiter]],
) -> None:
    """The review's repro, shared: 6 parallel requests of 300 inputs of a ``tpm = 1000`` key,
    3 to each replica. Each reserves its tokens in Redis before it queues: one is answered,
    five get the key's 429."""
    (a, _), (b, _) = replicas

    def post(client: httpx.AsyncClient, r: int) -> Coroutine[Any, Any, httpx.Response]:
        texts = [f"request {r}: text number {i} of a parallel burst" for i in range(300)]
        return client.post(
            "/v1/embeddings", json={"input": texts}, headers={"x-test-tenant": "burst"}
        )

    answers = await asyncio.gather(*(post(a if r % 2 else b, r) for r in range(6)))
    assert sorted(r.status_code for r in answers) == [200] + [429] * 5
    for refused in (r for r in answers if r.status_code == 429):
        assert "tokens per minute" in refused.json()["error"]["message"]
        assert refused.headers["x-ratelimit-remaining-tokens"] == "0"


async def test_a_reservation_falls_back_and_is_settled_in_process_when_redis_is_lost(
    server: RedisServer,
) -> None:
    """Admitted through Redis, then Redis is gone: the reservation is taken in this process
    (as an admission would be), and the finish refunds it there and charges what was spent
    there too (Redis cannot take it)."""
    limits = KeyLimits(tpm=1000)
    limiter = RateLimiter.from_url(server.url, timeout_s=0.3, probe_interval_s=60)
    try:
        _, lease = await limiter.admit("k", limits)
        assert lease is not None and lease.shared
        server.stop()
        verdict, shared = await limiter.reserve(lease, 400)
        assert verdict.refused is None and not shared
        assert not limiter.redis_up
        during = limiter.local.admit("k", limits).tokens
        assert during is not None and during.remaining == 600
        task = limiter.finish(lease, 100, reserved=400, reserved_here=400)
        assert task is not None
        await task
        left = limiter.local.admit("k", limits).tokens
        assert left is not None and left.remaining == 900  # 400 back, 100 charged here
    finally:
        await limiter.aclose()


async def test_concurrency_is_shared_and_released_through_redis(
    tiny_model_dir: Path, server: RedisServer
) -> None:
    one = KeyLimits(max_concurrent=1)
    first = RateLimiter.from_url(server.url)
    second = RateLimiter.from_url(server.url)
    try:
        verdict, lease = await first.admit("k", one)
        assert verdict.refused is None and lease is not None and lease.shared
        assert (await second.admit("k", one))[0].refused == "concurrency"
        first.finish(lease, 0)

        async def admitted() -> bool:
            verdict, lease = await second.admit("k", one)
            if lease is not None:
                second.finish(lease, 0)
            return verdict.refused is None

        await eventually(admitted)
    finally:
        await first.aclose()
        await second.aclose()


async def test_a_redis_that_hangs_is_left_after_the_timeout_and_rejoined(
    server: RedisServer,
) -> None:
    """A frozen Redis (SIGSTOP: a partition, not a refused connection) costs one timeout, then
    limits are per process until it answers again. One: the client retried a timed-out call,
    so a request admitted as Redis stalled waited twice ``redis_timeout_s`` (four times with
    the cache's Redis tier: 2.0 s at the default 0.5 s, review), and a timed-out script could
    run twice when Redis woke."""
    lim = RateLimiter.from_url(server.url, timeout_s=1.0, probe_interval_s=0.2)
    limits = KeyLimits(rpm=1000)
    assert server.proc is not None
    try:
        verdict, lease = await lim.admit("k", limits)
        assert lease is not None and lease.shared
        server.proc.send_signal(signal.SIGSTOP)
        try:
            t0 = time.monotonic()
            verdict, lease = await lim.admit("k", limits)
            waited = time.monotonic() - t0
            assert verdict.refused is None and lease is not None and not lease.shared
            assert lim.backend == "local"
            assert 0.9 < waited < 1.6, waited  # one timeout, not two, nor a hang
            _, lease = await lim.admit("k", limits)  # no more waiting while it is away
            assert lease is not None and not lease.shared
        finally:
            server.proc.send_signal(signal.SIGCONT)
        await eventually(lambda: lim.backend == "redis", 20)
        _, lease = await lim.admit("k", limits)
        assert lease is not None and lease.shared
    finally:
        await lim.aclose()


async def test_a_connection_that_died_with_a_redis_restart_is_retried_at_once(
    server: RedisServer,
) -> None:
    """A restart leaves the pooled connection dead: one quick retry on a new one, no fallback."""
    lim = RateLimiter.from_url(server.url, timeout_s=1.0, probe_interval_s=60)
    limits = KeyLimits(rpm=1000)
    try:
        _, lease = await lim.admit("k", limits)
        assert lease is not None and lease.shared
        server.stop()
        server.start()  # the same port
        _, lease = await lim.admit("k", limits)
        assert lease is not None and lease.shared and lim.backend == "redis"
    finally:
        await lim.aclose()


async def _stalled(server: RedisServer, seconds: float) -> None:
    """Redis frozen (SIGSTOP) for ``seconds``: a hiccup, not an outage."""
    assert server.proc is not None
    server.proc.send_signal(signal.SIGSTOP)
    await asyncio.sleep(seconds)
    server.proc.send_signal(signal.SIGCONT)


@pytest.mark.parametrize("stalled_at", ["finish", "admit"])
async def test_a_redis_stall_does_not_hold_a_concurrency_slot_for_the_lease(
    server: RedisServer, stalled_at: str
) -> None:
    """A slot whose release failed, or whose admission timed out but ran when Redis woke, was
    held for the 300 s lease: a max_concurrent=1 key got 429s for 5 minutes after a 1 s stall.
    Now it is released when the probe finds Redis back."""
    one = KeyLimits(max_concurrent=1)
    lim = RateLimiter.from_url(server.url, timeout_s=0.2, probe_interval_s=2.0)
    other = RateLimiter.from_url(server.url)  # another replica, never cut off
    try:
        if stalled_at == "finish":
            _, lease = await lim.admit("k", one)
            assert lease is not None and lease.shared
            stall = asyncio.ensure_future(_stalled(server, 1.0))
            await asyncio.sleep(0.05)
            lim.finish(lease, 0)  # its ZREM times out
        else:
            stall = asyncio.ensure_future(_stalled(server, 1.0))
            await asyncio.sleep(0.05)
            _, lease = await lim.admit("k", one)  # times out
            assert lease is not None and not lease.shared
            lim.finish(lease, 0)
        await eventually(lambda: lim.backend == "local", 5)
        await stall
        if stalled_at == "admit":
            # What the review saw: Redis ran the timed-out script when it woke (here written
            # for it, before the probe's first ping: whether Redis runs a command from a
            # connection its client has closed is Redis's race, not this test's).
            with redis.Redis(port=server.port) as r:
                r.zadd("embedplex:rl:{k}:c", {lease.lease_id: time.time() + 300})
        await eventually(lambda: lim.backend == "redis", 10)

        async def admitted() -> bool:
            verdict, lease = await other.admit("k", one)
            if lease is not None:
                other.finish(lease, 0)
            return verdict.refused is None

        await eventually(admitted, 5)  # not after the 300 s lease
    finally:
        await lim.aclose()
        await other.aclose()


async def test_a_sequential_client_is_never_refused_across_replicas(
    tiny_model_dir: Path, server: RedisServer
) -> None:
    """The slot used to be released in a task started after the answer was written: a client
    sending its next request to another replica on receiving an answer could find it still
    held (429 "concurrent requests"). Now it is back in Redis before the answer is written."""
    one = {"seq": KeyLimits(max_concurrent=1)}
    async with AsyncExitStack() as stack:
        clients = [
            await stack.enter_async_context(
                running(limited_app(tiny_model_dir, FakeBackend(), one, redis_url=server.url))
            )
            for _ in range(2)
        ]
        with redis.Redis(port=server.port) as r:
            for i in range(20):
                answer = await clients[i % 2].post(
                    "/v1/embeddings", json={"input": f"hi {i}"}, headers={"x-test-tenant": "seq"}
                )
                assert answer.status_code == 200, answer.text
                # Read at once (a blocking call: no task of the server's runs meanwhile).
                assert r.zcard("embedplex:rl:{seq}:c") == 0


def _tat(server: RedisServer) -> float:
    """The ``tpm`` bucket's TAT of key ``k`` in Redis (seconds, Redis's clock)."""
    with redis.Redis(port=server.port) as r:
        return float(r.hget("embedplex:rl:{k}", "t") or 0)


async def _pushed(lim: RateLimiter, limits: KeyLimits, tokens: int) -> None:
    """Charge ``tokens`` to key ``k`` in Redis, so that its TAT stays ahead of Redis's clock
    (and what later requests add to it can be read off it exactly), through a reservation:
    each script is then loaded in Redis (a call of one it has not seen fails there with
    NOSCRIPT, and a stalled call would never run, whatever the limiter does)."""
    _, lease = await lim.admit("k", limits)
    assert lease is not None and lease.shared
    verdict, shared = await lim.reserve(lease, 1)
    assert verdict.refused is None and shared
    task = lim.finish(lease, tokens, reserved=1)
    assert task is not None
    await task


TPM_600 = KeyLimits(tpm=600)  # a token is 0.1 s of the TAT


async def _lease_then_stall(
    lim: RateLimiter, server: RedisServer, seconds: float
) -> tuple[float, Lease, asyncio.Future[None]]:
    """A ``TPM_600`` lease admitted in Redis (the bucket part spent, its TAT returned), then
    Redis stopped for ``seconds`` (the future ends when it runs again)."""
    await _pushed(lim, TPM_600, 300)
    t0 = _tat(server)
    _, lease = await lim.admit("k", TPM_600)
    assert lease is not None and lease.shared
    stall = asyncio.ensure_future(_stalled(server, seconds))
    await asyncio.sleep(0.05)
    return t0, lease, stall


@pytest.mark.parametrize("finish_in_stall", [False, True])
async def test_a_reservation_whose_redis_call_timed_out_is_settled_exactly(
    server: RedisServer, finish_in_stall: bool
) -> None:
    """The review's repro: Redis stalls (SIGSTOP) past the timeout while a request reserves
    200 tokens; the limiter reserves them here instead, and Redis runs the script when it
    wakes. Redis's bucket kept all 200 on top of the 30 the request spent. Now the finish
    charges the 30 less what the lease reserved in Redis; a finish that fails too charges the
    30 here, and the probe gives the 200 back in Redis (unless that finish ran there late)."""
    lim = RateLimiter.from_url(server.url, timeout_s=0.2, probe_interval_s=0.2)
    try:
        t0, lease, stall = await _lease_then_stall(lim, server, 1.0)
        verdict, shared = await lim.reserve(lease, 200)  # times out: taken in this process
        assert verdict.refused is None and not shared
        if not finish_in_stall:
            await stall
        task = lim.finish(lease, 30, reserved=200, reserved_here=200)
        assert task is not None
        await task
        await stall
        await eventually(lambda: lim.backend == "redis", 10)
        await asyncio.sleep(0.2)  # anything Redis still had to run has run
        charged = (_tat(server) - t0) / 0.1
        if finish_in_stall:
            assert -0.5 < charged < 30.5  # 30 in Redis if the finish ran there late, else 0
        else:
            assert 29.5 < charged < 30.5
    finally:
        await lim.aclose()


async def test_a_reservation_cancelled_in_flight_is_given_back_in_redis(
    server: RedisServer,
) -> None:
    """The client leaves while its request's reservation waits on a slow Redis (not failed:
    no timeout): the call was sent and Redis runs it, but the request ran nothing. Redis's
    bucket kept the 200. Now the finish refunds what the lease took there, or, if the call
    is still on its way, marks the lease settled so that it takes nothing."""
    lim = RateLimiter.from_url(server.url, timeout_s=2.0, probe_interval_s=0.2)
    try:
        t0, lease, stall = await _lease_then_stall(lim, server, 0.5)
        reserving = asyncio.ensure_future(lim.reserve(lease, 200))
        await asyncio.sleep(0.1)
        reserving.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await reserving
        await stall
        task = lim.finish(lease, 0)  # nothing ran; the Spend reserved nothing it knows of
        assert task is not None
        await task
        await asyncio.sleep(0.2)
        assert abs(_tat(server) - t0) / 0.1 < 0.5
        assert lim.backend == "redis"
    finally:
        await lim.aclose()


async def test_parts_of_one_batch_never_refuse_each_other_through_redis(
    tiny_model_dir: Path, server: RedisServer
) -> None:
    """The review's repro: one ``/v1/embeddings/batch`` of 5 sub-requests on a fresh
    ``tpm = 1000`` key, limits in Redis, one sub-request refused: its reservation ran in Redis
    after a sibling's that it then counted as someone else's. Here the first reservation call
    to reach Redis is held back 0.3 s (a slow connection), so any sibling in flight overtakes
    it. Now one request's reservations are taken one at a time: every part is answered."""
    app = limited_app(
        tiny_model_dir, FakeBackend(), {"parts": KeyLimits(tpm=1000)}, redis_url=server.url
    )
    async with running(app) as client:
        shared = app.state.rate_limiter.shared
        reserve = shared.reserve
        calls = 0

        async def first_held_back(*args: Any, **kwargs: Any) -> Any:
            nonlocal calls
            calls += 1
            if calls == 1:
                await asyncio.sleep(0.3)
            return await reserve(*args, **kwargs)

        shared.reserve = first_held_back
        requests = [
            {"id": str(j), "input": [f"part {j} text {i} " + "z" * 30 for i in range(100)]}
            for j in range(5)
        ]
        answer = await client.post(
            "/v1/embeddings/batch", json={"requests": requests}, headers={"x-test-tenant": "parts"}
        )
    assert answer.status_code == 200, answer.text
    results = answer.json()["results"]
    assert [r.get("error") for r in results] == [None] * 5


def _state_keys(key: str) -> list[str]:
    return [f"embedplex:rl:{{{key}}}", f"embedplex:rl:{{{key}}}:c", f"embedplex:rl:{{{key}}}:v"]


async def test_one_keys_broken_state_in_redis_is_reset_and_leaves_the_others_shared(
    server: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    """Another type under one key's Redis state (a hand edit, another writer) made every
    script of that key fail with WRONGTYPE, which was taken for Redis going away: every key of
    every replica fell back to per-process limits, and the probe, which settles remembered
    leases first, failed on that key for ever (review: shared limits never came back)."""
    caplog.set_level(logging.WARNING, logger="embedplex.limits")
    lim = RateLimiter.from_url(server.url, timeout_s=1.0, probe_interval_s=0.2)
    check = redis.Redis(port=server.port)
    bad = KeyLimits(rpm=100, max_concurrent=5)
    try:
        check.set(_state_keys("bad")[1], b"not a sorted set")
        verdict, lease = await lim.admit("bad", bad)
        assert verdict.refused is None and lease is not None and not lease.shared
        assert lim.backend == "redis"
        _, other = await lim.admit("good", KeyLimits(rpm=1000))
        assert other is not None and other.shared
        await eventually(lambda: check.exists(*_state_keys("bad")) == 0)
        _, lease = await lim.admit("bad", bad)  # reset: shared again, from a full bucket
        assert lease is not None and lease.shared
        warned = [r.getMessage() for r in caplog.records]
        assert len(warned) == 1 and "key bad's state in Redis" in warned[0], warned
    finally:
        check.close()
        await lim.aclose()


async def test_settling_leases_resets_a_broken_key_and_settles_the_others(
    server: RedisServer,
) -> None:
    client = redis.asyncio.Redis(port=server.port)
    shared = RedisLimits(client)
    check = redis.Redis(port=server.port)
    try:
        limits = KeyLimits(max_concurrent=2)
        assert (await shared.admit("good", limits, "g1")).refused is None
        check.set(_state_keys("bad")[1], b"not a sorted set")
        await shared.settle({"bad": (0, {"b1"}), "good": (0, {"g1"})})
        assert check.exists(*_state_keys("bad")) == 0
        assert check.zcard(_state_keys("good")[1]) == 0  # its slot given back
    finally:
        check.close()
        await shared.aclose()
