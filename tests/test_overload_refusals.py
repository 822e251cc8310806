"""Refusals under overload stay cheap: no body parsed, no log line each, and past a fast rate
they are held (``api/pacing.py``) so that clients retrying at once cannot starve accepted work.
"""

from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path

import httpx
import pytest

from embedplex.api.pacing import FAST_PER_S, RefusalPacer
from embedplex.backends.fake import FakeBackend
from embedplex.core.tenant import KeyLimits
from helpers import eventually, fake_app, running
from tenants import limited_app


async def _one_in_flight(
    client: httpx.AsyncClient, backend: FakeBackend
) -> asyncio.Future[httpx.Response]:
    """A request that holds the only slot (max_concurrent_requests=1) for ``backend.delay``."""
    held = asyncio.ensure_future(client.post("/embed", json={"inputs": "hold"}))
    await eventually(lambda: len(backend.batches) > 0)
    return held


async def test_an_overload_refusal_reads_no_body(tiny_model_dir: Path) -> None:
    backend = FakeBackend(delay=1.0)
    app = fake_app(tiny_model_dir, backend, max_concurrent_requests=1)
    async with running(app) as client:
        held = await _one_in_flight(client, backend)
        garbage = await client.post(
            "/v1/embeddings", content=b"{not json", headers={"content-type": "application/json"}
        )
        rerank = await client.post("/rerank", content=b"[")  # no reranker: not refused here
        assert (await held).status_code == 200
        after = await client.post("/v1/embeddings", content=b"{not json")
    # Refused before the body was read: a parsed body would have been a 400.
    assert garbage.status_code == 429 and garbage.json()["error"]["code"] == "overloaded"
    assert rerank.status_code == 400
    assert after.status_code == 400  # with room again, the body is parsed as always


def test_the_pacer_answers_a_burst_at_once_then_holds() -> None:
    pacer = RefusalPacer(hold=0.25)
    fast = [pacer.delay() for _ in range(int(FAST_PER_S))]
    assert fast == [0.0] * int(FAST_PER_S)
    assert pacer.delay() == 0.25 and pacer.held == 1
    time.sleep(0.05)  # the bucket refills at FAST_PER_S a second
    assert pacer.delay() == 0.0
    assert RefusalPacer(hold=0).delay() == 0.0  # off


async def test_a_storm_of_refusals_is_paced_and_logged_once_a_second(
    tiny_model_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    backend = FakeBackend(delay=3.0)
    app = fake_app(tiny_model_dir, backend, max_concurrent_requests=1, overload_refusal_hold_ms=200)
    caplog.set_level(logging.INFO, logger="embedplex.access")
    async with running(app) as client:
        held = await _one_in_flight(client, backend)
        n = int(FAST_PER_S) + 40
        answers = []
        slowest = 0.0
        for _ in range(n):
            started = time.perf_counter()
            answers.append((await client.post("/embed", json={"inputs": "x"})).status_code)
            slowest = max(slowest, time.perf_counter() - started)
        held.cancel()
    assert answers == [429] * n
    assert slowest >= 0.15  # held past the fast rate (200 ms configured)
    lines = [r for r in caplog.records if " 429 " in r.getMessage()]
    assert 1 <= len(lines) <= 30  # one a second, not one per refusal (n of them)


async def test_the_requests_in_flight_429_says_when_to_retry(tiny_model_dir: Path) -> None:
    """docs/api.md: an admission refusal carries Retry-After: 1; "N requests in flight" had none,
    for a key with tokens per minute as for any caller."""
    backend = FakeBackend(delay=1.0)
    limits = {"tpm": KeyLimits(tpm=1_000_000)}
    app = limited_app(tiny_model_dir, backend, limits, max_concurrent_requests=1)
    async with running(app) as client:
        held = await _one_in_flight(client, backend)
        plain = await client.post("/embed", json={"inputs": "x"})
        keyed = await client.post(
            "/v1/embeddings", json={"input": "x"}, headers={"x-test-tenant": "tpm"}
        )
        assert (await held).status_code == 200
    for refused in (plain, keyed):
        assert refused.status_code == 429, refused.text
        assert refused.headers["retry-after"] == "1"
    assert "1 requests in flight" in plain.json()["error"]
    assert "x-ratelimit-limit-tokens" in keyed.headers  # the key's own headers, beside it
