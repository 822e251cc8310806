"""Per-key limits: the GCRA rules in process, and the same outcomes from the Redis script."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from typing import Protocol

import pytest
from redis.asyncio import Redis

from embedplex.api.ratelimit import duration, headers
from embedplex.core.tenant import KeyLimits
from embedplex.limits import LocalLimits, RedisLimits, Verdict
from redis_server import NO_REDIS_SERVER, REDIS_SERVER, RedisServer, redis_server


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


def test_rpm_admits_a_minute_of_requests_then_refills_one_per_interval(clock: Clock) -> None:
    local = LocalLimits(clock)
    limits = KeyLimits(rpm=3)
    verdicts = [local.admit("k", limits) for _ in range(4)]
    assert [v.refused for v in verdicts] == [None, None, None, "rpm"]
    assert [v.requests.remaining for v in verdicts if v.requests] == [2, 1, 0, 0]
    assert verdicts[3].retry_after == pytest.approx(20.0)  # one request per 20 s
    assert verdicts[2].requests is not None
    assert verdicts[2].requests.reset_s == pytest.approx(60.0)  # full again in a minute
    clock.now += 20.0
    assert local.admit("k", limits).refused is None
    assert local.admit("k", limits).refused == "rpm"
    assert local.admit("other", limits).refused is None  # keys are apart


def test_tokens_are_charged_at_finish_and_an_overspend_waits(clock: Clock) -> None:
    local = LocalLimits(clock)
    limits = KeyLimits(tpm=600)  # 10 tokens a second
    first = local.admit("k", limits)
    assert first.refused is None
    assert first.tokens is not None and first.tokens.remaining == 600
    local.finish("k", limits, 900)  # more than was left: allowed once
    refused = local.admit("k", limits)
    assert refused.refused == "tpm"
    assert refused.tokens is not None and refused.tokens.remaining == 0
    # 300 tokens over the minute's bucket: back above zero after 30 s and one token's time.
    assert refused.retry_after == pytest.approx(30.1)
    clock.now += 30.0
    assert local.admit("k", limits).refused == "tpm"
    clock.now += 0.15
    again = local.admit("k", limits)
    assert again.refused is None
    assert again.tokens is not None and again.tokens.remaining == 1


class Store(Protocol):
    """``LocalLimits`` or ``RedisLimits`` as the shared story below drives them."""

    async def admit(self, lease: str) -> Verdict: ...
    async def reserve(self, tokens: int, held: int) -> Verdict: ...
    async def finish(self, lease: str, tokens: int) -> None: ...


async def _reservations(store: Store) -> list[tuple[str | None, int]]:
    """Two requests of a ``tpm = 600`` key admitted together, as a store decides them: (the
    limit that refused, tokens left) after each step. Written once for both stores."""

    def seen(v: Verdict) -> tuple[str | None, int]:
        return v.refused, v.tokens.remaining if v.tokens else -1

    out = [seen(await store.admit("a")), seen(await store.admit("b"))]
    for tokens, held in ((900, 0), (10, 0), (50, 900)):
        out.append(seen(await store.reserve(tokens, held)))
    await store.finish("a", 300 - 950)  # a spent 300 of the 950 it reserved: 650 back
    await store.finish("b", 0)
    out.append(seen(await store.admit("c")))
    await store.finish("c", -10_000)  # a refund never fills the bucket past full
    out.append(seen(await store.admit("d")))
    return out


# a and b admitted with 600 left; a reserves 900 (one overspend), b's reservation is refused
# (0 left), a's second part is not (what a holds does not count against it); a's refund leaves
# 300; the bucket is never fuller than full.
RESERVATIONS = [
    (None, 600),
    (None, 600),
    (None, 0),
    ("tpm", 0),
    (None, 0),
    (None, 300),
    (None, 600),
]
TPM_600 = KeyLimits(tpm=600)  # 10 tokens a second


class _Local:
    def __init__(self, local: LocalLimits) -> None:
        self.local = local

    async def admit(self, lease: str) -> Verdict:
        return self.local.admit("k", TPM_600)

    async def reserve(self, tokens: int, held: int) -> Verdict:
        return self.local.reserve("k", TPM_600, tokens, held)

    async def finish(self, lease: str, tokens: int) -> None:
        self.local.finish("k", TPM_600, tokens)


class _Shared:
    def __init__(self, shared: RedisLimits) -> None:
        self.shared = shared

    async def admit(self, lease: str) -> Verdict:
        return await self.shared.admit("k", TPM_600, lease)

    async def reserve(self, tokens: int, held: int) -> Verdict:
        return await self.shared.reserve("k", TPM_600, tokens, held)

    async def finish(self, lease: str, tokens: int) -> None:
        await self.shared.finish("k", TPM_600, lease, tokens)


async def test_a_reservation_is_taken_before_the_work_and_settled_at_finish(clock: Clock) -> None:
    local = LocalLimits(clock)
    assert await _reservations(_Local(local)) == RESERVATIONS
    assert local.reserve("k", TPM_600, 10_000).refused is None  # a full bucket: taken
    refused = local.reserve("k", TPM_600, 1)
    assert refused.refused == "tpm"
    # 9,400 tokens over the minute's bucket: a token is back in 940 s and one token's time.
    assert refused.retry_after == pytest.approx(940.1)
    assert local.reserve("k", KeyLimits(rpm=10), 5) == Verdict()  # no tpm: nothing to reserve


def test_concurrency_slots_come_back_at_finish(clock: Clock) -> None:
    local = LocalLimits(clock)
    limits = KeyLimits(max_concurrent=2)
    assert local.admit("k", limits).refused is None
    assert local.admit("k", limits).refused is None
    assert local.admit("k", limits).refused == "concurrency"
    local.finish("k", limits, 0)
    assert local.in_flight("k") == 1
    assert local.admit("k", limits).refused is None


def test_a_refusal_takes_nothing(clock: Clock) -> None:
    local = LocalLimits(clock)
    limits = KeyLimits(rpm=2, max_concurrent=1)
    assert local.admit("k", limits).refused is None
    assert local.admit("k", limits).refused == "concurrency"
    local.finish("k", limits, 0)
    assert local.admit("k", limits).refused is None  # the refusal did not use the 2nd request
    assert local.admit("k", limits).refused == "rpm"


def test_idle_keys_are_forgotten(clock: Clock) -> None:
    local = LocalLimits(clock)
    for i in range(100):
        local.admit(f"k{i}", KeyLimits(rpm=60))
        local.finish(f"k{i}", KeyLimits(rpm=60), 0)
    clock.now += 120
    local.admit("fresh", KeyLimits(rpm=60))
    assert len(local._keys) == 1


def test_headers_and_durations_as_openai_writes_them() -> None:
    assert [duration(s) for s in (0, 0.12, 8.64, 60, 360.5)] == [
        "0s",
        "120ms",
        "8.64s",
        "1m0s",
        "6m0.5s",
    ]
    verdict = LocalLimits().admit("k", KeyLimits(rpm=60, tpm=1000))
    got = dict(headers(verdict))
    assert got[b"x-ratelimit-limit-requests"] == b"60"
    assert got[b"x-ratelimit-remaining-requests"] == b"59"
    assert got[b"x-ratelimit-reset-requests"] == b"1s"
    assert got[b"x-ratelimit-limit-tokens"] == b"1000"
    assert got[b"x-ratelimit-remaining-tokens"] == b"1000"
    assert got[b"x-ratelimit-reset-tokens"] == b"0s"
    assert headers(Verdict()) == []  # no limits, no headers


# -- the same rules in Redis ----------------------------------------------------------------


@pytest.fixture(scope="module")
def server() -> Iterator[RedisServer]:
    if REDIS_SERVER is None:
        pytest.skip(NO_REDIS_SERVER)
    with redis_server() as srv:
        yield srv


@pytest.fixture
async def shared(server: RedisServer) -> AsyncIterator[RedisLimits]:
    client = Redis.from_url(server.url)
    await client.flushdb()
    store = RedisLimits(client, lease_ttl_s=2.0)
    yield store
    await store.aclose()


async def test_redis_rpm_and_headers_match_the_local_rules(shared: RedisLimits) -> None:
    limits = KeyLimits(rpm=3, tpm=1000)
    verdicts = [await shared.admit("k", limits, f"l{i}") for i in range(4)]
    assert [v.refused for v in verdicts] == [None, None, None, "rpm"]
    assert [v.requests.remaining for v in verdicts if v.requests] == [2, 1, 0, 0]
    assert 19.0 < verdicts[3].retry_after <= 20.0
    assert verdicts[0].tokens is not None and verdicts[0].tokens.remaining == 1000


async def test_redis_tokens_charged_at_finish(shared: RedisLimits) -> None:
    limits = KeyLimits(tpm=600)
    assert (await shared.admit("k", limits, "a")).refused is None
    await shared.finish("k", limits, "a", 900)
    refused = await shared.admit("k", limits, "b")
    assert refused.refused == "tpm"
    assert 29.0 < refused.retry_after <= 30.1


async def test_redis_reservations_match_the_local_rules(shared: RedisLimits) -> None:
    """The same story in Redis (its clock runs: a few milliseconds may refill a token)."""
    outcomes = await _reservations(_Shared(shared))
    assert [o[0] for o in outcomes] == [o[0] for o in RESERVATIONS]
    for (_, got), (_, want) in zip(outcomes, RESERVATIONS, strict=True):
        assert want <= got <= want + 1
    assert (await shared.reserve("k", TPM_600, 10_000)).refused is None
    refused = await shared.reserve("k", TPM_600, 1)
    assert refused.refused == "tpm"
    assert refused.tokens is not None and refused.tokens.remaining == 0
    assert 939.0 < refused.retry_after <= 940.2
    assert await shared.reserve("k", KeyLimits(rpm=10), 5) == Verdict()


async def test_redis_concurrency_leases_release_and_expire(shared: RedisLimits) -> None:
    limits = KeyLimits(max_concurrent=1)
    assert (await shared.admit("k", limits, "a")).refused is None
    assert (await shared.admit("k", limits, "b")).refused == "concurrency"
    await shared.finish("k", limits, "a", 0)
    assert (await shared.admit("k", limits, "c")).refused is None
    # "c" is never finished (its replica died): its slot comes back with its lease (2 s here).
    for _ in range(100):
        if (await shared.admit("k", limits, "d")).refused is None:
            break
        await asyncio.sleep(0.1)
    else:
        raise AssertionError("an abandoned lease never expired")


def test_redis_url_is_a_secret() -> None:
    from embedplex.config import Settings

    settings = Settings(redis_url="redis://:hunter2@cache:6379/0")  # type: ignore[arg-type]
    assert settings.redacted()["redis_url"] == "***"
    assert "hunter2" not in repr(settings)


async def test_redis_settles_what_a_lease_reserved_there_whatever_its_caller_saw(
    shared: RedisLimits,
) -> None:
    """A reservation's script records what it took under its lease: the finish charges what
    the request spent less that, so a call whose answer was lost (timed out, cancelled) and
    that ran all the same is refunded exactly; one that runs after its lease was settled
    takes nothing; a lease whose finish never reached Redis is settled later (idempotent), and
    that finish, run late, changes nothing more. A ``tpm = 60`` key: a token a second."""
    limits = KeyLimits(tpm=60)

    async def left() -> int:
        tokens = (await shared.admit("k", limits, "probe")).tokens
        assert tokens is not None
        return tokens.remaining

    await shared.reserve("k", limits, 40, lease="a")  # ran; its caller never heard back
    assert 20 <= await left() <= 21
    await shared.finish("k", limits, "a", 10, doubt=True)  # spent 10: 30 back
    assert 50 <= await left() <= 51
    await shared.reserve("k", limits, 30, lease="a")  # the same call, run late: takes nothing
    assert 50 <= await left() <= 51
    await shared.reserve("k", limits, 20, lease="b")  # b's finish will not reach Redis
    assert 30 <= await left() <= 31
    for _ in range(2):
        await shared.settle({"k": (60, {"b"})})  # its 20 back (its tokens counted elsewhere)
        assert 50 <= await left() <= 51
    await shared.finish("k", limits, "b", 5)  # run late: settled already
    assert 50 <= await left() <= 52
