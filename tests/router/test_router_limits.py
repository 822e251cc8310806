"""A key's tokens per minute on remote routes: a request that ends without an answer is charged
the estimated tokens of its texts that went upstream (docs/limits.md)."""

from __future__ import annotations

import asyncio
import contextlib

import httpx
import pytest
from fastapi import FastAPI

from embedplex.api.app import create_app
from embedplex.api.pipeline import Pipeline
from embedplex.config import Settings
from embedplex.core.spend import estimated_tokens
from embedplex.core.tenant import KeyLimits, Tenant
from embedplex.limits import Lease, LocalLimits, RateLimiter, Verdict
from embedplex.providers.config import RouteConfig
from helpers import eventually
from tenants import TenantByHeader
from upstream_fakes import FakeUpstream, Fault, provider

KEY = {"x-test-tenant": "k"}


async def test_a_request_cancelled_while_upstream_is_charged_its_texts(
    upstream: FakeUpstream,
) -> None:
    settings = Settings(
        local_model=False,
        providers=[provider("a", upstream, max_attempts=1)],
        routes=[RouteConfig(model="remote-x", providers=["a"])],
    )
    app = create_app(settings)
    pipeline = app.edge
    assert isinstance(pipeline, Pipeline)
    pipeline.stages.insert(2, TenantByHeader({"k": Tenant(key_id="k", limits=KeyLimits(tpm=1000))}))
    limiter: RateLimiter = app.state.rate_limiter
    limiter.local = LocalLimits(lambda: 5000.0)  # a frozen clock: no refill
    texts = ["a text that went upstream", "and another one"]
    async with app.router.lifespan_context(app):
        await app.state.loader
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://router") as client:
            upstream.delay = 2.0
            body = {"model": "remote-x", "input": texts}
            task = asyncio.create_task(client.post("/v1/embeddings", json=body, headers=KEY))
            await eventually(lambda: len(upstream.calls) == 1)  # the texts went upstream
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            await eventually(lambda: limiter.local.in_flight("k") == 0)
            upstream.delay = 0.0
            after = await client.get("/v1/models", headers=KEY)
    charged = 1000 - int(after.headers["x-ratelimit-remaining-tokens"])
    assert charged == sum(estimated_tokens(len(t)) for t in texts)


def _limited(settings: Settings, tpm: int) -> tuple[FastAPI, RateLimiter]:
    """The app of ``settings`` with key ``k`` (``tpm``) on a frozen clock (no refill)."""
    app = create_app(settings)
    pipeline = app.edge
    assert isinstance(pipeline, Pipeline)
    pipeline.stages.insert(2, TenantByHeader({"k": Tenant(key_id="k", limits=KeyLimits(tpm=tpm))}))
    limiter: RateLimiter = app.state.rate_limiter
    limiter.local = LocalLimits(lambda: 5000.0)
    return app, limiter


async def _remaining(client: httpx.AsyncClient) -> int:
    return int(
        (await client.get("/v1/models", headers=KEY)).headers["x-ratelimit-remaining-tokens"]
    )


async def test_a_failover_reserves_once_and_the_over_estimate_is_refunded(
    upstream: FakeUpstream, upstream2: FakeUpstream
) -> None:
    """Provider a fails, the route fails over to b with the same texts: they are reserved once
    (not once per provider) while b works; the answer's usage (the upstream's count, below the
    estimate) is what the key is charged in the end."""
    settings = Settings(
        local_model=False,
        providers=[provider("a", upstream, max_attempts=1), provider("b", upstream2)],
        routes=[RouteConfig(model="remote-x", providers=["a", "b"])],
    )
    app, _ = _limited(settings, 1000)
    texts = ["x" * 400, "y" * 400]  # 102 tokens each by estimate; the fake upstream says 3
    estimate = sum(estimated_tokens(len(t)) for t in texts)
    async with app.router.lifespan_context(app):
        await app.state.loader
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://router") as client:
            upstream.script(Fault(status=500))
            upstream2.delay = 1.0
            body = {"model": "remote-x", "input": texts}
            task = asyncio.create_task(client.post("/v1/embeddings", json=body, headers=KEY))
            await eventually(lambda: len(upstream2.calls) == 1)  # failed over: b works
            during = await _remaining(client)
            answer = await task
            after = await _remaining(client)
    assert len(upstream.calls) == 1
    assert answer.status_code == 200, answer.text
    assert during == 1000 - estimate
    assert answer.json()["usage"]["prompt_tokens"] == 3 * len(texts)
    assert after == 1000 - 3 * len(texts)


async def test_a_burst_to_a_remote_route_is_refused_by_the_key_not_failed_over(
    upstream: FakeUpstream, upstream2: FakeUpstream
) -> None:
    """Six parallel requests of a ``tpm = 1000`` key to a route of two providers, all admitted
    before any reserves (held back here until then): one reserves past what was left and is
    answered; the others' reservations get the key's 429, which is not a provider's failure (no
    failover: the second provider never hears of them)."""
    settings = Settings(
        local_model=False,
        providers=[provider("a", upstream), provider("b", upstream2)],
        routes=[RouteConfig(model="remote-x", providers=["a", "b"])],
    )
    app, limiter = _limited(settings, 1000)
    admit, reserve = limiter.admit, limiter.reserve
    admitted = 0

    async def counted(key: str, limits: KeyLimits) -> tuple[Verdict, Lease | None]:
        nonlocal admitted
        admitted += 1
        return await admit(key, limits)

    async def held_back(lease: Lease, tokens: int, held: int = 0) -> tuple[Verdict, bool]:
        await eventually(lambda: admitted == 6)
        return await reserve(lease, tokens, held)

    limiter.admit = counted  # type: ignore[method-assign]
    limiter.reserve = held_back  # type: ignore[method-assign]
    async with app.router.lifespan_context(app):
        await app.state.loader
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://router") as client:
            upstream.delay = 0.3
            answers = await asyncio.gather(
                *(
                    client.post(
                        "/v1/embeddings",
                        json={"model": "remote-x", "input": [f"{r} {i} " * 20 for i in range(50)]},
                        headers=KEY,
                    )
                    for r in range(6)
                )
            )
            runtimes = app.state.gateway.router.runtimes
            counters = {name: rt.counters for name, rt in runtimes.items()}
    assert sorted(a.status_code for a in answers) == [200] + [429] * 5
    assert counters["a"]["failovers"] == 0 and counters["a"]["requests_failed"] == 0
    for refused in (a for a in answers if a.status_code == 429):
        assert "tokens per minute" in refused.json()["error"]["message"]
    assert upstream2.calls == []


@pytest.mark.parametrize(
    ("kind", "path"),
    [("cohere", "/v1/rerank"), ("cohere", "/rerank"), ("tei", "/v1/rerank")],
)
async def test_a_rerank_answer_without_a_token_count_is_charged_its_estimate(
    upstream: FakeUpstream, kind: str, path: str
) -> None:
    """Cohere's rerank answers bill search units, not tokens (and a TEI behind a proxy may lose
    its x-compute-tokens): the answer's usage, and the key's charge, is each pair's estimate,
    what was reserved. It was 0: the reservation was refunded whole, and a ``tpm = 100`` key
    reranked 3 documents of 2,000 characters four times over, each answer 200. Now a
    ``tpm = 2000`` key has 485 tokens left after one such request, the next spends past them
    (as any request may: docs/limits.md), and the third is refused."""
    upstream.rerank_counts = False
    settings = Settings(
        local_model=False,
        providers=[provider("c", upstream, kind)],
        routes=[RouteConfig(model="rerank", providers=["c"], kind="rerank")],
    )
    app, _ = _limited(settings, 2000)
    query, docs = "what is a fox", [c * 2000 for c in "xyz"]
    estimate = sum(estimated_tokens(len(query) + len(d)) for d in docs)  # 505 each: 1,515
    body = (
        {"model": "rerank", "query": query, "documents": docs}
        if path == "/v1/rerank"
        else {"model": "rerank", "query": query, "texts": docs}
    )
    async with app.router.lifespan_context(app):
        await app.state.loader
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://router") as client:
            first = await client.post(path, json=body, headers=KEY)
            after = await _remaining(client)
            second = await client.post(path, json=body, headers=KEY)
            third = await client.post(path, json=body, headers=KEY)
    assert first.status_code == 200, first.text
    if path == "/v1/rerank":
        assert first.json()["usage"]["total_tokens"] == estimate
    assert after == 2000 - estimate
    assert second.status_code == 200, second.text
    assert third.status_code == 429  # the key's bucket is in debt: tpm holds
    assert "tokens per minute" in third.text
    assert len(upstream.calls) == 2


async def test_an_embedding_answer_without_a_token_count_is_charged_its_estimate(
    upstream: FakeUpstream,
) -> None:
    """An OpenAI-compatible upstream that sends no ``usage``: each text is charged its
    estimate, what was reserved (it was charged 0, and the reservation refunded whole, so a
    ``tpm`` key embedded through such a provider without limit)."""
    upstream.embed_counts = False
    settings = Settings(
        local_model=False,
        providers=[provider("o", upstream, "openai")],
        routes=[RouteConfig(model="remote", providers=["o"])],
    )
    app, _ = _limited(settings, 2000)
    bodies = [{"model": "remote", "input": [c * 2000 for c in cs]} for cs in ("xyz", "uvw", "rst")]
    estimate = 3 * estimated_tokens(2000)  # 502 each: 1,506 (texts differ: no cache hit)
    async with app.router.lifespan_context(app):
        await app.state.loader
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://router") as client:
            first = await client.post("/v1/embeddings", json=bodies[0], headers=KEY)
            after = await _remaining(client)
            second = await client.post("/v1/embeddings", json=bodies[1], headers=KEY)
            third = await client.post("/v1/embeddings", json=bodies[2], headers=KEY)
    assert first.status_code == 200, first.text
    assert first.json()["usage"]["prompt_tokens"] == estimate
    assert after == 2000 - estimate
    assert second.status_code == 200, second.text
    assert third.status_code == 429  # the key's bucket is in debt: tpm holds
    assert len(upstream.calls) == 2
