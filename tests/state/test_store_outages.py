"""A PostgreSQL state store that stops answering (a frozen host, a partition: connections stay
open, no bytes come back), behind a TCP proxy that can hang: every use of the store is bounded
by ``state_timeout_s``. A key not seen before gets a prompt 503, admin calls 503, the poller
warns each poll and catches up when the store answers again, an admin change the store cannot
keep changes nothing, and usage counts survive a shutdown in the middle of a slow flush.

Each await on the server is itself bounded (``within``), so the code before these bounds
fails these tests instead of hanging them.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable
from contextlib import asynccontextmanager
from typing import TypeVar

import httpx
import pytest

from embedplex.api.app import create_app
from embedplex.state.keys import KeySpec, KeyStore
from embedplex.state.providers import ProviderStore
from embedplex.state.store import StateStore, bump
from embedplex.state.usage import UsageMeter, usage_since
from gateways import ADMIN, gateway_settings
from helpers import running
from pg_proxy import PgProxy, pg_proxy
from state_fixtures import pg_url  # noqa: F401  (fixture)
from upstream_fakes import FakeUpstream, provider, running_upstream

T = TypeVar("T")
BOUND_S = 1.0  # state_timeout_s of the servers here


async def within(seconds: float, work: Awaitable[T]) -> T:
    """``work``, or the test fails after ``seconds`` (a hang must not hang the suite)."""
    try:
        return await asyncio.wait_for(work, seconds)
    except TimeoutError:
        raise AssertionError(f"no answer within {seconds} s") from None


def timed(started: float) -> float:
    return time.monotonic() - started


@pytest.fixture
def proxy(pg_url: str) -> AsyncIterator[PgProxy]:  # noqa: F811
    with pg_proxy(pg_url) as p:
        yield p


@pytest.fixture
def up() -> AsyncIterator[FakeUpstream]:
    with running_upstream() as fake:
        yield fake


@asynccontextmanager
async def gateway(state_url: str, upstream: FakeUpstream) -> AsyncIterator[httpx.AsyncClient]:
    app = create_app(gateway_settings(state_url, upstream, state_timeout_s=BOUND_S))
    async with running(app) as client:
        yield client


async def embed(client: httpx.AsyncClient, key: str, model: str = "remote") -> httpx.Response:
    body = {"input": "hello", "model": model}
    headers = {"authorization": f"Bearer {key}"}
    return await within(10, client.post("/v1/embeddings", json=body, headers=headers))


async def new_key(client: httpx.AsyncClient, name: str) -> str:
    r = await within(10, client.post("/api/v1/keys", json={"name": name}, headers=ADMIN))
    assert r.status_code == 201, r.text
    key: str = r.json()["key"]
    return key


async def test_a_store_that_stops_answering_is_a_prompt_503_and_the_poll_recovers(
    proxy: PgProxy,
    pg_url: str,  # noqa: F811
    up: FakeUpstream,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="embedplex.state")
    async with gateway(proxy.url(pg_url), up) as client:
        seen, unseen = await new_key(client, "seen"), await new_key(client, "unseen")
        assert (await embed(client, seen)).status_code == 200  # verified, now cached

        proxy.mode = "hang"
        started = time.monotonic()
        # Two first requests of one key share one verification: both get the 503 in time.
        answers = await asyncio.gather(embed(client, unseen), embed(client, unseen))
        assert timed(started) < BOUND_S + 1.5, timed(started)
        for r in answers:
            assert r.status_code == 503, r.text
            assert "the key store is unavailable" in r.text
        assert (await embed(client, seen)).status_code == 200  # verified keys keep working

        started = time.monotonic()
        listed = await within(10, client.get("/api/v1/keys", headers=ADMIN))
        assert listed.status_code == 503 and "state store is unavailable" in listed.text
        created = await within(10, client.post("/api/v1/keys", json={"name": "x"}, headers=ADMIN))
        assert created.status_code == 503, created.text
        assert timed(started) < 2 * BOUND_S + 1.5, timed(started)

        # Meanwhile the cached key is revoked elsewhere (straight in the store, not through
        # the proxy): the poller, warning each poll, applies it once the store answers.
        async with StateStore.from_url(pg_url) as direct:
            await KeyStore(direct).revoke("seen")
        await asyncio.sleep(3 * BOUND_S)
        warned = [r for r in caplog.records if "state store poll failed" in r.getMessage()]
        assert len(warned) >= 2, [r.getMessage() for r in caplog.records]
        assert "TimeoutError" in warned[0].getMessage()
        assert (await embed(client, seen)).status_code == 200  # not seen yet: still cached

        proxy.mode = "pass"
        started = time.monotonic()
        while (await embed(client, seen)).status_code != 401:
            assert timed(started) < 10, "the revocation never arrived"
            await asyncio.sleep(0.1)
        assert (await embed(client, unseen)).status_code == 200
        listed = await within(10, client.get("/api/v1/keys", headers=ADMIN))
        assert listed.status_code == 200


async def test_keys_verified_before_a_change_keep_working_when_the_store_then_hangs(
    proxy: PgProxy,
    pg_url: str,  # noqa: F811
    up: FakeUpstream,
) -> None:
    """A key created elsewhere (any change to keys or providers) emptied every replica's
    verified keys; a store that stopped answering before their next request made each of them
    503 for the whole outage (review: two gateways, a key made, PostgreSQL frozen). The poll
    now checks the cached keys against their rows instead: those not changed stay verified."""
    app = create_app(gateway_settings(proxy.url(pg_url), up, state_timeout_s=BOUND_S))
    async with running(app) as client:
        seen = await new_key(client, "seen")
        assert (await embed(client, seen)).status_code == 200  # verified, now cached
        async with StateStore.from_url(pg_url) as direct:  # elsewhere: another replica, the CLI
            await KeyStore(direct).create(KeySpec(name="unrelated"))
            version = await direct.version()
        started = time.monotonic()
        while app.state.keys.version != version:  # the poll (every 0.2 s) has seen the change
            assert timed(started) < 10, "the change never arrived"
            await asyncio.sleep(0.05)

        proxy.mode = "hang"
        assert (await embed(client, seen)).status_code == 200


async def test_a_provider_change_the_store_cannot_keep_changes_nothing(
    proxy: PgProxy,
    pg_url: str,  # noqa: F811
    up: FakeUpstream,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Stored first, then applied: a store that does not answer is a 503 that changed nothing
    here (before: the router changed, a 500 or a hang, and the next poll undid the change)."""
    added = {"provider": provider("added", up).model_dump(mode="json"), "serve_as": "added-m"}
    kept = {"provider": provider("kept", up).model_dump(mode="json"), "serve_as": "kept-m"}

    async def names(client: httpx.AsyncClient) -> list[str]:
        r = await within(10, client.get("/api/v1/providers", headers=ADMIN))
        return sorted(p["name"] for p in r.json()["data"])

    async with gateway(proxy.url(pg_url), up) as client:
        r = await within(10, client.post("/api/v1/providers", json=kept, headers=ADMIN))
        assert r.status_code == 201, r.text

        proxy.mode = "hang"
        started = time.monotonic()
        r = await within(10, client.post("/api/v1/providers", json=added, headers=ADMIN))
        # No answer within the bound: the 503 cannot say the change was not made (a COMMIT
        # sent may land), and says so; this one never reached the server.
        assert r.status_code == 503 and "may have been applied" in r.text, r.text
        gone = await within(10, client.delete("/api/v1/providers/kept", headers=ADMIN))
        assert gone.status_code == 503, gone.text
        assert timed(started) < 2 * BOUND_S + 1.5, timed(started)
        assert await names(client) == ["kept", "up"]
        assert (await embed(client, "", "added-m")).status_code == 404
        assert (await embed(client, "", "kept-m")).status_code == 200

        # The store answers again, and a change elsewhere makes every replica apply the
        # stored providers: still exactly what the 503s left.
        proxy.mode = "pass"
        async with StateStore.from_url(pg_url) as direct:
            assert set(await ProviderStore(direct).all()) == {"kept"}
            async with direct.engine.begin() as conn:
                await bump(conn)
        await asyncio.sleep(1.0)
        assert await names(client) == ["kept", "up"]

        # A provider stored but failing to start here is taken out of the store again.
        async def refuse(*_: object) -> None:
            raise RuntimeError("cannot start")

        monkeypatch.setattr("embedplex.providers.runtime.ProviderRuntime.start", refuse)
        r = await within(10, client.post("/api/v1/providers", json=added, headers=ADMIN))
        assert r.status_code == 500, r.text
        async with StateStore.from_url(pg_url) as direct:
            assert set(await ProviderStore(direct).all()) == {"kept"}
        assert await names(client) == ["kept", "up"]


async def test_usage_counted_during_a_slow_flush_survives_a_shutdown(
    proxy: PgProxy,
    pg_url: str,  # noqa: F811
) -> None:
    """SIGTERM while a periodic flush writes: the flush is let finish, not cancelled with its
    counts (which it had taken out of the meter), and the rest is written after it."""
    store = StateStore.from_url(proxy.url(pg_url))
    await within(30, store.upgrade())
    meter = UsageMeter(store, flush_s=0.05)
    for _ in range(7):
        meter.add("k1", 2, 3, refused=False)
    proxy.delay_s, proxy.mode = 0.3, "slow"
    meter.start()
    while meter._counts:  # noqa: ASYNC110 (taken by the periodic flush, which is writing)
        await asyncio.sleep(0.01)
    meter.add("k1", 1, 1, refused=True)  # counted while it writes
    await within(30, meter.close())
    await store.close()
    async with StateStore.from_url(pg_url) as direct:
        totals = await usage_since(direct, None)
    assert [(t.key_id, t.requests, t.inputs, t.tokens, t.refusals) for t in totals] == [
        ("k1", 8, 15, 22, 1)
    ]


async def test_usage_that_cannot_be_written_at_shutdown_is_logged_as_lost(
    proxy: PgProxy,
    pg_url: str,  # noqa: F811
    caplog: pytest.LogCaptureFixture,
) -> None:
    store = StateStore.from_url(proxy.url(pg_url), timeout_s=BOUND_S)
    await within(30, store.upgrade())
    meter = UsageMeter(store, flush_s=3600)
    meter.start()
    for _ in range(5):
        meter.add("k1", 1, 1, refused=False)
    proxy.mode = "hang"
    started = time.monotonic()
    await within(10, meter.close())
    assert timed(started) < 2 * BOUND_S + 1.5, timed(started)
    await within(10, store.close())
    lost = [r.getMessage() for r in caplog.records if "lost" in r.getMessage()]
    assert lost and "usage of 5 requests" in lost[0], caplog.text
