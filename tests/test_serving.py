"""Backpressure and disconnects under a real uvicorn server with a slow fake backend."""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path

import httpx
import pytest

from embedplex.backends.fake import FakeBackend
from helpers import fake_app, running, served


async def post_many(
    url: str, n: int, path: str = "/embed"
) -> list[tuple[int, float, dict[str, object]]]:
    async with httpx.AsyncClient(timeout=10) as client:

        async def one(i: int) -> tuple[int, float, dict[str, object]]:
            start = time.perf_counter()
            key = "input" if path.startswith("/v1") else "inputs"
            r = await client.post(url + path, json={key: f"cat {i}"})
            return r.status_code, time.perf_counter() - start, r.json()

        return await asyncio.gather(*(one(i) for i in range(n)))


async def test_over_concurrency_limit_gets_429_at_once(tiny_model_dir: Path) -> None:
    backend = FakeBackend(delay=0.4)
    app = fake_app(tiny_model_dir, backend, max_concurrent_requests=2)
    with served(app) as url:
        results = await post_many(url, 6)
    codes = sorted(code for code, _, _ in results)
    assert codes == [200, 200, 429, 429, 429, 429]
    refusals = [(t, body) for code, t, body in results if code == 429]
    assert all(t < 0.3 for t, _ in refusals)  # refused without waiting for the backend
    assert all(body["error_type"] == "Overloaded" for _, body in refusals)


async def test_full_queue_gets_429(tiny_model_dir: Path) -> None:
    backend = FakeBackend(delay=0.3)
    app = fake_app(
        tiny_model_dir, backend, max_queue_size=2, max_client_batch_size=2, max_batch_requests=1
    )
    with served(app) as url:
        results = await post_many(url, 6)
    codes = [code for code, _, _ in results]
    assert codes.count(429) >= 2
    assert codes.count(200) >= 2
    assert set(codes) <= {200, 429}


async def test_queue_timeout_gets_503(tiny_model_dir: Path) -> None:
    backend = FakeBackend(delay=0.5)
    app = fake_app(
        tiny_model_dir, backend, queue_timeout_ms=100, max_batch_requests=1, inference_streams=1
    )
    with served(app) as url:
        results = await post_many(url, 3, path="/v1/embeddings")
    codes = sorted(code for code, _, _ in results)
    assert codes == [200, 503, 503]
    timed_out = [body for code, _, body in results if code == 503]
    assert all(body["error"]["code"] == "queue_timeout" for body in timed_out)  # type: ignore[index]


async def test_a_request_bigger_than_the_queue_timeout_succeeds_while_it_progresses(
    tiny_model_dir: Path,
) -> None:
    """Its later inputs wait behind its earlier ones, not for nothing: 10 batches of 0.05 s
    against a 0.3 s timeout are answered (before, every input had to start within 0.3 s of
    the request: 503 after 6 batches computed and thrown away)."""
    backend = FakeBackend(delay=0.05)
    app = fake_app(
        tiny_model_dir, backend, queue_timeout_ms=300, max_batch_requests=2, inference_streams=1
    )
    texts = [f"text number {k}" for k in range(20)]
    async with running(app) as client:
        r = await client.post("/v1/embeddings", json={"input": texts})
    assert r.status_code == 200, r.text
    assert len(r.json()["data"]) == 20
    assert [size for size, _ in backend.batches] == [2] * 10


async def test_disconnected_client_is_dropped_from_the_queue(tiny_model_dir: Path) -> None:
    backend = FakeBackend(delay=0.4)
    app = fake_app(tiny_model_dir, backend, inference_streams=1)  # one batch at a time
    with served(app) as url:
        async with httpx.AsyncClient() as client:
            first = asyncio.create_task(
                client.post(url + "/embed", json={"inputs": "cat"}, timeout=5)
            )
            await asyncio.sleep(0.1)  # the first batch is running
            with pytest.raises(httpx.ReadTimeout):
                await client.post(url + "/embed", json={"inputs": ["dog", "fox"]}, timeout=0.1)
            assert (await first).status_code == 200
            await asyncio.sleep(0.6)  # the dropped request would have run by now
            after = await client.post(url + "/embed", json={"inputs": "the"}, timeout=5)
    assert after.status_code == 200
    assert [size for size, _ in backend.batches] == [1, 1]  # "dog"/"fox" never reached it


async def test_streams_run_batches_at_once(tiny_model_dir: Path) -> None:
    backend = FakeBackend(delay=0.3)
    running = 0
    most = 0
    count = threading.Lock()
    inner = backend.embed

    def embed(batch: object) -> object:
        nonlocal running, most
        with count:
            running += 1
            most = max(most, running)
        try:
            return inner(batch)  # type: ignore[arg-type]
        finally:
            with count:
                running -= 1

    backend.embed = embed  # type: ignore[method-assign,assignment]
    app = fake_app(tiny_model_dir, backend, inference_streams=2, max_batch_requests=1)
    async with httpx.AsyncClient() as client:
        with served(app) as url:
            first, second, third = await asyncio.gather(
                *(client.post(url + "/embed", json={"inputs": w}, timeout=5) for w in "abc")
            )
    assert [r.status_code for r in (first, second, third)] == [200, 200, 200]
    assert most == 2  # two streams: two batches at once, never three
    assert sorted(size for size, _ in backend.batches) == [1, 1, 1]


async def test_batches_fit_one_forward_pass_and_group_lengths_across_the_queue(
    tiny_model_dir: Path,
) -> None:
    """A backend that runs ``run_tokens`` at a time gets batches of that size, lengths grouped."""
    backend = FakeBackend(delay=0.3)
    backend.run_tokens = 80  # a long text here costs 32 tokens (estimated 39): two fit, not three
    app = fake_app(tiny_model_dir, backend, inference_streams=1)  # one batch at a time
    # Two of each length, distinct: identical texts in flight would share one slot (dedupe.py).
    longs, shorts = ("word " * 30, "word " * 29 + "hi"), ("hi", "word")
    async with httpx.AsyncClient() as client:
        with served(app) as url:

            async def post(text: str) -> int:
                r = await client.post(url + "/embed", json={"inputs": text}, timeout=5)
                return r.status_code

            busy = asyncio.create_task(post("keeps the backend busy"))
            await asyncio.sleep(0.1)
            # Queued behind it in arrival order long, short, long, short.
            queued = []
            for text in (longs[0], shorts[0], longs[1], shorts[1]):
                queued.append(asyncio.create_task(post(text)))
                await asyncio.sleep(0.02)
            codes = [await busy, *await asyncio.gather(*queued)]
    assert codes == [200] * 5
    # The oldest (long) text's batch takes the other long one, then the two short ones run;
    # a budget of one batch for all four would have padded both short texts to 32 tokens.
    assert backend.batches[1:] == [(2, 32), (2, 3)]


@pytest.mark.parametrize(("run_tokens", "in_force"), [(None, 4096), (80, 80)])
async def test_info_reports_the_budget_in_force(
    tiny_model_dir: Path, run_tokens: int | None, in_force: int
) -> None:
    """/info says the budget batches are cut by, not the setting it was decided from."""
    backend = FakeBackend()
    backend.run_tokens = run_tokens
    app = fake_app(tiny_model_dir, backend, max_batch_tokens=4096, max_batch_requests=16)
    async with running(app) as client:
        info = (await client.get("/info")).json()
        policy = app.state.gateway.model(None).batcher.policy
    assert (info["max_batch_tokens"], info["max_batch_requests"]) == (in_force, 16)
    assert (policy.max_cost, policy.max_items) == (in_force, 16)
