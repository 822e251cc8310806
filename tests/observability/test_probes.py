"""Probes reflect reality: loading, draining, and a dead backend (which must not hang requests)."""

from __future__ import annotations

import asyncio
import threading

import httpx

from embedplex.api.app import create_app
from embedplex.backends.fake import FakeBackend
from embedplex.config import Settings
from embedplex.gateway import Gateway

from .conftest import Served, fake_factory, serve, settings, value


async def test_dead_backend_flips_readiness_and_fails_fast(served: Served) -> None:
    c = served.client
    assert (await c.get("/health/ready")).status_code == 200
    served.backend.die()
    ready = await c.get("/health/ready")
    assert ready.status_code == 503
    assert "dead" in ready.json()["status"]
    assert (await c.get("/health")).status_code == 503
    assert (await c.get("/health/live")).status_code == 200
    async with asyncio.timeout(5):
        first = await c.post("/embed", json={"inputs": "x"})
        later = await c.post("/embed", json={"inputs": "x"})
    assert first.status_code == 424  # the batch that met the dead backend
    assert later.status_code == 503  # refused at admission from then on
    m = await served.metrics()
    assert value(m, "embedplex_ready") == 0


async def test_backend_dying_under_load_answers_every_request() -> None:
    backend = FakeBackend(delay=0.1)
    one_batch_at_a_time = settings(max_batch_requests=1, inference_streams=1)
    async with serve(one_batch_at_a_time, backend=backend) as srv:
        calls = [srv.client.post("/embed", json={"inputs": f"t{i}"}) for i in range(6)]
        tasks = [asyncio.create_task(call) for call in calls]
        await asyncio.sleep(0.05)
        backend.die()
        async with asyncio.timeout(5):
            responses = await asyncio.gather(*tasks)
        codes = sorted(r.status_code for r in responses)
        assert codes[0] == 200  # the batch already running finishes
        assert set(codes[1:]) <= {424, 503}
        assert 503 in codes
        assert (await srv.client.get("/health/ready")).status_code == 503


async def test_not_ready_while_loading_then_ready() -> None:
    release = threading.Event()
    inner = fake_factory(FakeBackend())

    def slow_factory(s: Settings) -> Gateway:
        release.wait(10)
        return inner(s)

    app = create_app(settings(), gateway_factory=slow_factory)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as c:
            loading = await c.get("/health/ready")
            assert loading.status_code == 503
            assert loading.json()["status"] == "loading"
            assert (await c.get("/health/live")).status_code == 200
            release.set()
            for _ in range(500):
                if (await c.get("/health/ready")).status_code == 200:
                    break
                await asyncio.sleep(0.01)
            assert (await c.get("/health/ready")).status_code == 200


async def test_not_ready_while_draining(served: Served) -> None:
    served.app.state.gateway.draining = True
    r = await served.client.get("/health/ready")
    assert r.status_code == 503
    assert r.json()["status"] == "draining"
