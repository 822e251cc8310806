"""A key's tokens per minute on remote routes: a request that ends without an answer is charged
the estimated tokens of its texts that went upstream (docs/limits.md)."""

from __future__ import annotations

import asyncio
import contextlib

import httpx

from embedplex.api.app import create_app
from embedplex.api.pipeline import Pipeline
from embedplex.config import Settings
from embedplex.core.spend import estimated_tokens
from embedplex.core.tenant import KeyLimits, Tenant
from embedplex.limits import LocalLimits, RateLimiter
from embedplex.providers.config import RouteConfig
from helpers import eventually
from tenants import TenantByHeader
from upstream_fakes import FakeUpstream, provider

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
