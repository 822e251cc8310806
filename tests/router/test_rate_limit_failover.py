"""A 429 under the ``any`` policy: fail over at once while a later provider can answer, pass
the rate-limited provider over until its Retry-After ends, wait it out only on the last one."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest

from conftest import RouterFactory
from embedplex.core.errors import RateLimitedError
from embedplex.core.types import EmbedRequest, RerankRequest
from embedplex.providers.router import Router
from upstream_fakes import FakeUpstream, Fault, provider

# Retries could cover a Retry-After of several seconds: only the failover makes it fast.
PATIENT: dict[str, Any] = {"retry_budget_s": 30.0}


def req(text: str) -> EmbedRequest:
    return EmbedRequest(inputs=[text])


async def pair(make_router: RouterFactory, a: FakeUpstream, b: FakeUpstream) -> Router:
    router: Router = await make_router(provider("a", a, **PATIENT), provider("b", b, **PATIENT))
    return router


async def test_a_429_fails_over_at_once_and_keeps_the_provider_out_until_retry_after(
    upstream: FakeUpstream, upstream2: FakeUpstream, make_router: RouterFactory
) -> None:
    router = await pair(make_router, upstream, upstream2)
    upstream.script(Fault(status=429, retry_after="1"))
    began = time.monotonic()
    first = await router.embed(req("x"), ["a", "b"], "any")
    assert time.monotonic() - began < 0.5  # not the second it asked for
    assert first.provider == "b"
    assert len(upstream.calls) == 1  # one attempt, no retry
    health = router.runtimes["a"].health
    assert 0.5 < health.limited_for() <= 1.0
    assert router.runtimes["a"].stats()["health"]["rate_limited_for_s"] > 0.5
    # Until then a is passed over without a call, as an open circuit is.
    second = await router.embed(req("y"), ["a", "b"], "any")
    assert second.provider == "b"
    assert len(upstream.calls) == 1
    # After it, a is asked again (and answers).
    await asyncio.sleep(health.limited_for() + 0.05)
    third = await router.embed(req("z"), ["a", "b"], "any")
    assert third.provider == "a"
    assert len(upstream.calls) == 2


async def test_the_last_provider_waits_out_its_429(
    upstream: FakeUpstream, upstream2: FakeUpstream, make_router: RouterFactory
) -> None:
    router = await pair(make_router, upstream, upstream2)
    upstream.script(Fault(status=429, retry_after="5"))
    upstream2.script(Fault(status=429, retry_after="0.3"))
    began = time.monotonic()
    result = await router.embed(req("x"), ["a", "b"], "any")
    took = time.monotonic() - began
    # a failed over at once; b, with nothing after it, slept 0.3 s and answered.
    assert result.provider == "b"
    assert 0.3 <= took < 2
    assert len(upstream.calls) == 1
    assert len(upstream2.calls) == 2


async def test_a_one_provider_route_still_waits_out_a_429(
    upstream: FakeUpstream, make_router: RouterFactory
) -> None:
    router = await make_router(provider("a", upstream, **PATIENT))
    upstream.script(Fault(status=429, retry_after="0.3"))
    began = time.monotonic()
    result = await router.embed(req("x"), ["a"], "any")
    assert result.provider == "a"
    assert time.monotonic() - began >= 0.3
    assert len(upstream.calls) == 2
    # A Retry-After past the budget still reaches the caller at once, as before.
    upstream.script(Fault(status=429, retry_after="60"))
    with pytest.raises(RateLimitedError) as info:
        await router.embed(req("y"), ["a"], "any")
    assert info.value.retry_after == 60


async def test_a_call_shared_with_a_caller_that_cannot_fail_over_waits_for_it(
    upstream: FakeUpstream, upstream2: FakeUpstream, make_router: RouterFactory
) -> None:
    """One call answers both callers: the one with only ``a`` keeps its wait (and the other
    waits with it); later callers that can go elsewhere do."""
    router = await pair(make_router, upstream, upstream2)
    upstream.script(Fault(status=429, retry_after="0.3"))
    only_a, either = await asyncio.gather(
        router.embed(req("x"), ["a"], "any"), router.embed(req("y"), ["a", "b"], "any")
    )
    assert only_a.provider == either.provider == "a"
    assert [sorted(call.texts) for call in upstream.calls] == [["x", "y"], ["x", "y"]]
    assert upstream2.calls == []


async def test_rerank_fails_over_on_a_429_too(
    upstream: FakeUpstream, upstream2: FakeUpstream, make_router: RouterFactory
) -> None:
    router = await pair(make_router, upstream, upstream2)
    upstream.script(Fault(status=429, retry_after="5"))
    began = time.monotonic()
    result = await router.rerank(RerankRequest(query="q", texts=["d1", "d2"]), ["a", "b"])
    assert time.monotonic() - began < 0.5
    assert result.provider == "b"
    assert len(upstream.calls) == 1
