"""Failures inside the process: a batching loop that dies, a hung forward pass, a dead backend,
a model that fails to load. Callers fail at once, readiness names the cause, liveness fails
after its grace period (docs/reliability.md, "Failures inside")."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from pathlib import Path

import pytest

from embedplex.api.app import create_app
from embedplex.backends.fake import FakeBackend
from embedplex.batching import Batcher, BatchPolicy, FifoQueue
from embedplex.config import Settings
from embedplex.core.errors import FatalBackendError, NotReadyError
from embedplex.gateway import Gateway
from helpers import fake_app, running


class Blocked:
    """A run function that never finishes until ``release`` is set."""

    def __init__(self) -> None:
        self.release = asyncio.Event()
        self.calls = 0

    async def __call__(self, payloads: list[str]) -> Sequence[str]:
        self.calls += 1
        await self.release.wait()
        return [p.upper() for p in payloads]


class BrokenQueue(FifoQueue):
    """A queue whose bookkeeping raises once armed: the loop task dies of it."""

    armed = False

    def drop_gone(self) -> int:
        if self.armed:
            raise RuntimeError("a bug in the loop")
        return super().drop_gone()


async def test_a_loop_that_dies_fails_every_queued_caller_at_once() -> None:
    run = Blocked()
    queue = BrokenQueue()
    policy = BatchPolicy(max_items=1, queue_timeout=60)
    async with Batcher("t", run, policy, queue=queue) as b:
        first = b.submit(["a"], [1])  # in flight, blocked
        await asyncio.sleep(0.05)
        queued = b.submit(["b", "c"], [1, 1])
        queue.armed = True
        started = time.perf_counter()
        run.release.set()  # the slot frees, the loop runs again and dies
        results = await asyncio.wait_for(
            asyncio.gather(*(i.future for i in queued), return_exceptions=True), 10
        )
        waited = time.perf_counter() - started
        assert await first[0].future == "A"
        assert all(isinstance(r, NotReadyError) for r in results), results
        assert waited < 10  # not the 60 s queue timeout
        assert isinstance(b.fatal, FatalBackendError)
        assert "batching loop failed (RuntimeError)" in b.fatal.message
        with pytest.raises(NotReadyError):
            b.submit(["d"], [1])


async def test_the_watchdog_fails_a_hung_batch_and_everyone_queued() -> None:
    run = Blocked()
    policy = BatchPolicy(max_items=1, queue_timeout=60, run_timeout=0.2)
    async with Batcher("t", run, policy) as b:
        hung = b.submit(["a"], [1])
        queued = b.submit(["b"], [1])
        results = await asyncio.wait_for(
            asyncio.gather(*(i.future for i in [*hung, *queued]), return_exceptions=True), 10
        )
        assert all(isinstance(r, NotReadyError) for r in results), results
        assert "hung" in str(results[0]) and "0.2s" in str(results[0])
        assert isinstance(b.fatal, FatalBackendError) and b.fatal_at is not None
        assert run.calls == 1  # the queued one never reached the hung backend
        with pytest.raises(NotReadyError):
            b.submit(["c"], [1])
        run.release.set()  # the hung run ends late: nothing to answer, nothing raised
        await asyncio.sleep(0.05)
        assert b.in_flight == 0


async def test_a_hung_forward_pass_is_a_503_then_not_ready_then_not_live(
    tiny_model_dir: Path,
) -> None:
    backend = FakeBackend(delay=2.5)  # a forward pass in the inference thread that "hangs"
    app = fake_app(tiny_model_dir, backend, inference_timeout_s=0.2, liveness_grace_s=1.5)
    async with running(app) as client:
        started = time.perf_counter()
        hung = await client.post("/embed", json={"inputs": "a"})
        waited = time.perf_counter() - started
        ready = await client.get("/health/ready")
        live_at_once = await client.get("/health/live")
        await asyncio.sleep(1.6)
        live_later = await client.get("/health/live")
        refused = await client.post("/v1/embeddings", json={"input": "a"})
        await asyncio.sleep(1.0)  # the stuck thread finishes; its result is dropped
        after = await client.get("/health/ready")
    assert hung.status_code == 503 and hung.json()["error_type"] == "Unhealthy"
    assert "inference hung" in hung.json()["error"]
    assert waited < 2.5  # answered by the watchdog, not by the pass
    assert ready.status_code == 503 and "inference hung" in ready.json()["status"]
    assert live_at_once.status_code == 200  # the grace period: traffic moves away first
    assert live_later.status_code == 503
    assert live_later.json()["status"].startswith("dead: ")
    assert refused.status_code == 503
    assert after.status_code == 503  # dead for good: a late result does not revive it


async def test_a_dead_backend_fails_liveness_after_the_grace_period(
    tiny_model_dir: Path,
) -> None:
    backend = FakeBackend()
    quick = fake_app(tiny_model_dir, backend, liveness_grace_s=0)
    async with running(quick) as client:
        alive = await client.get("/health/live")
        backend.die()
        await client.post("/embed", json={"inputs": "a"})
        dead = await client.get("/health/live")
    assert alive.status_code == 200
    assert dead.status_code == 503 and "fake backend is dead" in dead.json()["status"]

    patient = fake_app(tiny_model_dir, FakeBackend(), liveness_grace_s=600)
    async with running(patient) as client:
        patient.state.gateway.services()[0].backend.die()
        still = await client.get("/health/live")
        ready = await client.get("/health/ready")
    assert still.status_code == 200
    assert ready.status_code == 503


async def test_a_model_that_fails_to_load_is_never_an_endless_loading() -> None:
    def broken(settings: Settings) -> Gateway:
        raise FileNotFoundError("no such model: org/missing")

    failures: list[str] = []
    app = create_app(Settings(liveness_grace_s=0), gateway_factory=broken)
    app.state.on_load_failure = failures.append  # what serve/server.py sets: it exits then
    async with app.router.lifespan_context(app):
        await asyncio.gather(app.state.loader, return_exceptions=True)
        import httpx

        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            ready = await client.get("/health/ready")
            live = await client.get("/health/live")
    assert failures == ["no such model: org/missing"]
    assert ready.status_code == 503
    # The reason is in serve's exit message and the log, never in the public probe body.
    assert ready.json()["status"].startswith("failed to load")
    assert "org/missing" not in ready.text
    assert live.status_code == 503


async def test_a_lazy_model_that_failed_to_load_does_not_fail_liveness(
    tiny_model_dir: Path,
) -> None:
    from test_gateway_models import app_of, lazy

    app = app_of(Settings(liveness_grace_s=0), lazy(tiny_model_dir, [], fail=True))
    async with running(app) as client:
        failed = await client.post("/embed", json={"inputs": "x", "model": "z"})
        live = await client.get("/health/live")
    assert failed.status_code == 503
    assert live.status_code == 200  # a restart would not fix its config, and "a" still serves


async def test_a_run_whose_callers_all_left_is_cancelled() -> None:
    started = asyncio.Event()
    cancelled = asyncio.Event()

    async def run(payloads: list[str]) -> Sequence[str]:
        started.set()
        try:
            await asyncio.sleep(60)  # an upstream that stalls
        except asyncio.CancelledError:
            cancelled.set()
            raise
        return payloads

    policy = BatchPolicy(max_items=4, cancel_abandoned=True)
    async with Batcher("t", run, policy) as b:
        items = b.submit(["a", "b"], [1, 1])
        await asyncio.wait_for(started.wait(), 5)
        items[0].future.cancel()  # one caller left: the run goes on for the other
        await asyncio.sleep(0.05)
        assert not cancelled.is_set()
        items[1].future.cancel()  # the last one left
        await asyncio.wait_for(cancelled.wait(), 5)
        await asyncio.sleep(0.01)
        assert b.in_flight == 0 and b.fatal is None
        again = b.submit(["c"], [1])  # the batcher still serves
        assert not again[0].future.done()
        again[0].future.cancel()  # (its run stalls too: leaving ends it, the close need not wait)
