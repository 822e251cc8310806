"""The router over real HTTP fakes: grouping, flushing, AIMD, breaker, policies, eviction."""

from __future__ import annotations

import asyncio
import time

import numpy as np
import pytest

from conftest import RouterFactory
from embedplex.core.deadline import REQUEST_DEADLINE, Deadline
from embedplex.core.errors import (
    EmptyInputError,
    InvalidRequestError,
    OverloadedError,
    RateLimitedError,
    UnavailableError,
    UpstreamError,
    UpstreamTimeoutError,
)
from embedplex.core.types import EmbedRequest
from embedplex.providers.config import RouteConfig
from embedplex.providers.health import CircuitState
from embedplex.providers.router import RemoteModel, Router
from embedplex.providers.runtime import PROBE_TEXT
from upstream_fakes import FakeUpstream, Fault, provider, vector_for


def req(*texts: str, **kw: object) -> EmbedRequest:
    return EmbedRequest(inputs=list(texts), **kw)  # type: ignore[arg-type]


def check(result_vectors: list[np.ndarray], texts: list[str]) -> None:
    for v, t in zip(result_vectors, texts, strict=True):
        np.testing.assert_array_equal(v, vector_for(t))


async def test_different_params_never_share_a_call(
    upstream: FakeUpstream, make_router: RouterFactory
) -> None:
    router = await make_router(provider("v", upstream, "voyage", max_wait_ms=50))
    variants = [
        {},
        {"dimensions": 4},
        {"extra": {"input_type": "query"}},
        {"truncate": False},
    ]
    jobs = [
        router.embed(req(f"text-{i}-{j}", **variant), ["v"])  # type: ignore[arg-type]
        for i, variant in enumerate(variants)
        for j in range(5)
    ]
    results = await asyncio.gather(*jobs)
    assert len(upstream.calls) == 4
    for call in upstream.calls:
        groups = {text.split("-")[1] for text in call.texts}
        assert len(groups) == 1, call.texts  # one parameter set per upstream call
        assert len(call.texts) == 5
    assert len(router.runtimes["v"].lanes) == 4
    np.testing.assert_array_equal(results[5].vectors[0], vector_for("text-1-0")[:4])


async def test_flush_on_size_does_not_wait(
    upstream: FakeUpstream, make_router: RouterFactory
) -> None:
    router = await make_router(provider("p", upstream, max_batch_size=4, max_wait_ms=5000))
    start = time.monotonic()
    texts = [f"t{i}" for i in range(8)]
    results = await asyncio.gather(*(router.embed(req(t), ["p"]) for t in texts))
    assert time.monotonic() - start < 2.0  # far below max_wait
    assert sorted(len(c.texts) for c in upstream.calls) == [4, 4]
    for r, t in zip(results, texts, strict=True):
        check(r.vectors, [t])


async def staggered(router: Router, *sends: tuple[str, float]) -> float:
    """Embed each ``(text, after)`` through provider "p", ``after`` seconds from now, checking
    its vector; the seconds all of them took."""

    async def one(text: str, after: float) -> None:
        await asyncio.sleep(after)
        check((await router.embed(req(text), ["p"])).vectors, [text])

    start = time.monotonic()
    await asyncio.gather(*(one(text, after) for text, after in sends))
    return time.monotonic() - start


async def test_flush_on_wait_collects_stragglers(
    upstream: FakeUpstream, make_router: RouterFactory
) -> None:
    """With the quiet flush off, the whole window: texts 50 ms apart share one call."""
    router = await make_router(
        provider("p", upstream, max_batch_size=100, max_wait_ms=150, max_quiet_ms=0)
    )

    assert await staggered(router, ("a", 0), ("b", 0.05), ("c", 0.1)) >= 0.15
    assert [sorted(c.texts) for c in upstream.calls] == [["a", "b", "c"]]


async def test_a_burst_that_is_over_does_not_wait_out_the_window(
    upstream: FakeUpstream, make_router: RouterFactory
) -> None:
    """Callers that sent all they had (closed-loop clients, one text each) are not held for
    the whole window: once no text has come for ``max_quiet_ms`` the lane flushes. Texts
    closer together than that still share the call."""
    router = await make_router(
        provider("p", upstream, max_batch_size=100, max_wait_ms=20_000, max_quiet_ms=300)
    )

    took = await staggered(router, ("a", 0), ("b", 0.02), ("c", 0.04))
    assert took < 10.0  # far below the 20 s window
    assert [sorted(c.texts) for c in upstream.calls] == [["a", "b", "c"]]
    # A text after the quiet spell is a call of its own.
    await staggered(router, ("d", 0), ("e", 0.9))
    assert [sorted(c.texts) for c in upstream.calls[1:]] == [["d"], ["e"]]


async def test_aimd_shrinks_on_413_splits_and_grows_back(
    upstream: FakeUpstream, make_router: RouterFactory
) -> None:
    upstream.max_texts = 4
    config = provider("p", upstream, max_batch_size=16, max_wait_ms=2000, aimd_increase=1)
    router = await make_router(config)
    texts = [f"t{i}" for i in range(16)]
    results = await asyncio.gather(*(router.embed(req(t), ["p"]) for t in texts))
    for r, t in zip(results, texts, strict=True):
        check(r.vectors, [t])
    sizes = [len(c.texts) for c in upstream.calls]
    assert sizes[0] == 16
    assert sorted(sizes) == [4, 4, 4, 4, 8, 8, 16]
    stats = router.runtimes["p"].stats()
    assert stats["aimd"]["decreases"] == 2  # 16 -> 8 -> 4 (the twin 8s halve once)
    assert stats["aimd"]["increases"] == 4
    assert stats["max_batch_requests"] == 8
    assert stats["counters"]["splits"] == 3
    # The lanes cut by the new size: 8 at a time, the upstream takes 4, so it splits again.
    upstream.max_texts = None
    await asyncio.gather(*(router.embed(req(t), ["p"]) for t in texts))
    assert [len(c.texts) for c in upstream.calls[7:]] == [8, 8]


async def test_aimd_halves_on_429_even_when_the_retry_succeeds(
    upstream: FakeUpstream, make_router: RouterFactory
) -> None:
    router = await make_router(provider("p", upstream, max_batch_size=32, aimd_increase=2))
    upstream.script(Fault(status=429, retry_after="0"))
    check((await router.embed(req("a"), ["p"])).vectors, ["a"])
    aimd = router.runtimes["p"].stats()["aimd"]
    assert aimd["decreases"] == 1
    assert aimd["batch_size"] == 18  # 32 -> 16, then +2 for the successful retry


async def test_429_after_retries_reaches_every_caller_of_the_batch(
    upstream: FakeUpstream, make_router: RouterFactory
) -> None:
    router = await make_router(provider("p", upstream, max_attempts=2))
    upstream.script(*[Fault(status=429, retry_after="0.2")] * 2)
    outcomes = await asyncio.gather(
        *(router.embed(req(f"t{i}"), ["p"]) for i in range(3)), return_exceptions=True
    )
    assert len(upstream.calls) == 2  # one batch, two attempts
    for exc in outcomes:
        assert isinstance(exc, RateLimitedError)
        assert exc.retry_after == 0.2


async def test_breaker_opens_refuses_fast_probes_and_closes(
    upstream: FakeUpstream, make_router: RouterFactory
) -> None:
    config = provider("p", upstream, max_attempts=1, breaker_failures=2, breaker_cooldown_s=0.3)
    router = await make_router(config)
    rt = router.runtimes["p"]
    upstream.script(Fault(status=500), Fault(status=502))
    for _ in range(2):
        with pytest.raises(UpstreamError):
            await router.embed(req("x"), ["p"])
    assert rt.health.state is CircuitState.OPEN
    with pytest.raises(UnavailableError):
        await router.embed(req("x"), ["p"])
    assert len(upstream.calls) == 2  # refused without calling upstream
    await router.probe()
    assert len(upstream.calls) == 2  # still cooling down: no probe yet
    await asyncio.sleep(0.3)
    assert rt.health.state is CircuitState.HALF_OPEN
    await router.probe()
    assert upstream.calls[-1].texts == [PROBE_TEXT]
    assert rt.health.state is CircuitState.CLOSED
    assert rt.counters["probes"] == 1
    check((await router.embed(req("y"), ["p"])).vectors, ["y"])


async def test_any_fails_over_and_skips_open_circuits(
    upstream: FakeUpstream, upstream2: FakeUpstream, make_router: RouterFactory
) -> None:
    router = await make_router(
        provider("a", upstream, max_attempts=1, breaker_failures=1, breaker_cooldown_s=60),
        provider("b", upstream2),
    )
    upstream.script(Fault(status=503))
    first = await router.embed(req("x"), ["a", "b"], "any")
    assert first.provider == "b"
    check(first.vectors, ["x"])
    assert router.runtimes["a"].health.state is CircuitState.OPEN
    second = await router.embed(req("y"), ["a", "b"], "any")
    assert second.provider == "b"
    assert len(upstream.calls) == 1  # a was skipped, not tried
    assert router.runtimes["a"].counters["failovers"] == 1


async def test_any_when_every_provider_fails_reports_them_all(
    upstream: FakeUpstream, upstream2: FakeUpstream, make_router: RouterFactory
) -> None:
    router = await make_router(
        provider("a", upstream, max_attempts=1), provider("b", upstream2, max_attempts=1)
    )
    upstream.script(Fault(status=429, retry_after="3"))
    upstream2.script(Fault(status=500))
    with pytest.raises(UpstreamError) as info:  # mixed: the last provider's error, all reasons
        await router.embed(req("x"), ["a", "b"], "any")
    assert "a:" in info.value.message
    assert "b:" in info.value.message
    # A router that has not seen a 429 yet (this one passes over a for 3 s now).
    router = await make_router(
        provider("a", upstream, max_attempts=1), provider("b", upstream2, max_attempts=1)
    )
    upstream.script(Fault(status=429, retry_after="5"))
    upstream2.script(Fault(status=429, retry_after="3"))
    with pytest.raises(RateLimitedError) as limited:
        await router.embed(req("x"), ["a", "b"], "any")
    assert limited.value.retry_after == 3


async def test_all_fans_out_and_fails_if_one_fails(
    upstream: FakeUpstream, upstream2: FakeUpstream, make_router: RouterFactory
) -> None:
    router = await make_router(
        provider("a", upstream), provider("b", upstream2, "tei", max_attempts=1)
    )
    result = await router.embed(req("x", "y"), ["a", "b"], "all")
    assert result.per_provider is not None
    assert list(result.per_provider) == ["a", "b"]
    for sub in result.per_provider.values():
        check(sub.vectors, ["x", "y"])
    assert len(upstream.calls) == len(upstream2.calls) == 1
    upstream2.script(Fault(status=500))
    with pytest.raises(UpstreamError):
        await router.embed(req("z"), ["a", "b"], "all")


async def test_idle_lanes_are_evicted_and_recreated(
    upstream: FakeUpstream, make_router: RouterFactory
) -> None:
    router = await make_router(provider("p", upstream), idle_ttl=0.2)
    await router.embed(req("a"), ["p"])
    await router.embed(req("b", dimensions=4), ["p"])
    rt = router.runtimes["p"]
    assert len(rt.lanes) == 2
    await asyncio.sleep(0.5)  # the sweeper runs every idle_ttl / 4
    assert rt.lanes == {}
    assert rt.counters["lanes_evicted"] == 2
    check((await router.embed(req("c"), ["p"])).vectors, ["c"])
    assert len(rt.lanes) == 1


async def test_compression_1000_requests_from_100_callers(
    upstream: FakeUpstream, make_router: RouterFactory
) -> None:
    upstream.delay = 0.01
    router = await make_router(provider("p", upstream, max_batch_size=128, max_wait_ms=50))

    async def caller(c: int) -> None:
        for i in range(10):
            text = f"caller {c} text {i}"
            check((await router.embed(req(text), ["p"])).vectors, [text])

    async with asyncio.timeout(30):
        await asyncio.gather(*(caller(c) for c in range(100)))
    assert sum(len(c.texts) for c in upstream.calls) == 1000
    print(f"upstream calls for 1000 requests from 100 callers: {len(upstream.calls)}")
    assert len(upstream.calls) <= 25


async def test_admission_and_validation(upstream: FakeUpstream, make_router: RouterFactory) -> None:
    router = await make_router(provider("p", upstream, max_queued=2, max_wait_ms=1000))
    with pytest.raises(OverloadedError):
        await router.embed(req("a", "b", "c"), ["p"])
    with pytest.raises(EmptyInputError):
        await router.embed(req(), ["p"])
    with pytest.raises(InvalidRequestError):
        await router.embed(EmbedRequest(inputs=[[1, 2, 3]]), ["p"])
    with pytest.raises(InvalidRequestError):  # openai type has no input_type
        await router.embed(req("a", extra={"input_type": "query"}), ["p"])
    assert upstream.calls == []


async def test_remote_model_serves_a_route_under_its_name(
    upstream: FakeUpstream, make_router: RouterFactory
) -> None:
    router = await make_router(provider("p", upstream))
    model = RemoteModel(router, RouteConfig(model="remote-x", providers=["p"]))
    await model.start()
    result = await model.embed(req("a"))
    assert result.model == "remote-x"
    assert result.provider == "p"
    stats = model.stats()
    assert stats["kind"] == "remote"
    assert stats["circuits"] == {"p": "closed"}


async def test_a_route_answers_504_at_the_request_deadline_and_stays_usable(
    upstream: FakeUpstream, make_router: RouterFactory
) -> None:
    router = await make_router(provider("p", upstream, max_wait_ms=1))
    model = RemoteModel(router, RouteConfig(model="remote-x", providers=["p"]))
    await model.start()
    upstream.delay = 5.0  # slower than the deadline below
    token = REQUEST_DEADLINE.set(Deadline.after(0.2, "X-Request-Timeout"))
    try:
        start = time.monotonic()
        with pytest.raises(UpstreamTimeoutError) as refused:
            await model.embed(req("slow"))
        assert refused.value.message.startswith("remote-x: no answer from the upstream")
        assert "(0.2s, X-Request-Timeout)" in refused.value.message
        assert time.monotonic() - start < 4  # not the upstream's 5 s
        task = asyncio.current_task()
        assert task is not None and task.cancelling() == 0  # the deadline's cancel taken back
        upstream.delay = 0.0
        REQUEST_DEADLINE.set(Deadline.after(5.0, "request_timeout_s"))
        result = await model.embed(req("fast"))  # the same task, a fresh deadline
    finally:
        REQUEST_DEADLINE.reset(token)
    assert result.model == "remote-x"
    check(result.vectors, ["fast"])


async def test_a_one_provider_route_fails_as_any_over_that_provider(
    upstream: FakeUpstream, make_router: RouterFactory
) -> None:
    """``RemoteModel.embed`` calls a lone provider straight: the same errors and counters."""
    router = await make_router(
        provider("p", upstream, max_attempts=1, breaker_failures=1, breaker_cooldown_s=60)
    )
    model = RemoteModel(router, RouteConfig(model="remote-x", providers=["p"]))
    await model.start()
    rt = router.runtimes["p"]
    with pytest.raises(EmptyInputError):
        await model.embed(req())
    with pytest.raises(InvalidRequestError):  # the request's fault: not a failover
        await model.embed(req("x", truncate=True))  # openai does not truncate
    assert rt.counters["failovers"] == 0
    assert upstream.calls == []
    upstream.script(Fault(status=503))
    with pytest.raises(UpstreamError) as failed:
        await model.embed(req("y"))
    assert failed.value.status == 503
    assert rt.counters["failovers"] == 1
    assert rt.health.state is CircuitState.OPEN
    calls = len(upstream.calls)
    with pytest.raises(UnavailableError, match="circuit is open"):
        await model.embed(req("z"))
    assert len(upstream.calls) == calls  # not tried
    assert rt.counters["failovers"] == 1
    assert model.stats()["active_requests"] == 0
