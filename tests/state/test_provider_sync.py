"""Two gateways (in process) on one PostgreSQL store: a provider changed through one's admin API
(removed, and added again under the same name with a new endpoint) within one poll of the
other is replaced there too, not left as the old one because its name is known."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections.abc import Iterator

import httpx
import pytest

from embedplex.api.app import create_app
from gateways import ADMIN, gateway_settings
from helpers import running
from state_fixtures import pg_url  # noqa: F401  (fixture)
from upstream_fakes import FakeUpstream, provider, running_upstream


@pytest.fixture
def upstreams() -> Iterator[tuple[FakeUpstream, FakeUpstream]]:
    with running_upstream() as a, running_upstream() as b:
        yield a, b


async def served_by(client: httpx.AsyncClient, a: FakeUpstream, b: FakeUpstream) -> str:
    """Which upstream answered a request for ``extra-model`` through ``client``."""
    text = f"which-{uuid.uuid4().hex}"
    r = await client.post("/v1/embeddings", json={"input": text, "model": "extra-model"})
    assert r.status_code == 200, r.text
    hits = [name for name, up in (("a", a), ("b", b)) if any(text in c.texts for c in up.calls)]
    assert len(hits) == 1, hits
    return hits[0]


async def test_a_provider_replaced_within_one_poll_is_replaced_on_the_other_gateway(
    pg_url: str,  # noqa: F811
    upstreams: tuple[FakeUpstream, FakeUpstream],
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="embedplex.state.providers")
    a, b = upstreams
    body_a = {"provider": provider("extra", a).model_dump(mode="json"), "serve_as": "extra-model"}
    body_b = {"provider": provider("extra", b).model_dump(mode="json"), "serve_as": "extra-model"}
    app_one, app_two = (create_app(gateway_settings(pg_url, a)) for _ in range(2))
    async with running(app_one) as one, running(app_two) as two:
        r = await one.post("/api/v1/providers", json=body_a, headers=ADMIN)
        assert r.status_code == 201, r.text
        for _ in range(100):  # gateway two applies it within a poll or two
            if "extra" in app_two.state.gateway.router.runtimes:
                break
            await asyncio.sleep(0.05)
        assert await served_by(two, a, b) == "a"

        # Gateway two's poller paused: both changes land between two of its polls.
        poller = app_two.state.keys._poller
        poller.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await poller
        assert (await one.delete("/api/v1/providers/extra", headers=ADMIN)).status_code == 200
        r = await one.post("/api/v1/providers", json=body_b, headers=ADMIN)
        assert r.status_code == 201, r.text
        assert await served_by(one, a, b) == "b"

        await app_two.state.keys.refresh()  # its next poll
        assert await served_by(two, a, b) == "b"
        # Applied once: a later poll with no change keeps it.
        await app_two.state.keys.refresh()
        assert await served_by(two, a, b) == "b"
        listed = await two.get("/api/v1/providers", headers=ADMIN)
        extra = next(p for p in listed.json()["data"] if p["name"] == "extra")
        assert extra["endpoint"] == body_b["provider"]["endpoint"]
        # Gateway one, which made the change, keeps its own provider through its polls: the
        # one replacement was gateway two's.
        await asyncio.sleep(1.0)
        assert await served_by(one, a, b) == "b"
        replaced = [r for r in caplog.records if "replaced" in r.getMessage()]
        assert len(replaced) == 1, [r.getMessage() for r in replaced]


async def test_a_replaced_provider_drains_in_the_background_while_its_model_serves_on(
    pg_url: str,  # noqa: F811
    upstreams: tuple[FakeUpstream, FakeUpstream],
) -> None:
    """A replacement starts the new provider and swaps it in; the old one's request in flight
    finishes behind it: new requests to the model are served meanwhile (they were 404
    "provider is not configured" for the whole drain), and the poll returns at once."""
    a, b = upstreams
    slow_a = provider("extra", a, timeout_s=10, retry_budget_s=20)
    body_a = {"provider": slow_a.model_dump(mode="json"), "serve_as": "extra-model"}
    body_b = {"provider": provider("extra", b).model_dump(mode="json"), "serve_as": "extra-model"}
    app_one, app_two = (create_app(gateway_settings(pg_url, a)) for _ in range(2))
    async with running(app_one) as one, running(app_two) as two:
        r = await one.post("/api/v1/providers", json=body_a, headers=ADMIN)
        assert r.status_code == 201, r.text
        for _ in range(100):
            if "extra" in app_two.state.gateway.router.runtimes:
                break
            await asyncio.sleep(0.05)
        poller = app_two.state.keys._poller
        poller.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await poller
        a.delay = 3.0
        body = {"input": f"slow-{uuid.uuid4().hex}", "model": "extra-model"}
        inflight = asyncio.create_task(two.post("/v1/embeddings", json=body))
        await asyncio.sleep(0.3)
        assert (await one.delete("/api/v1/providers/extra", headers=ADMIN)).status_code == 200
        assert (await one.post("/api/v1/providers", json=body_b, headers=ADMIN)).status_code == 201

        started = asyncio.get_running_loop().time()
        await asyncio.wait_for(app_two.state.keys.refresh(), 1.5)  # not the old one's drain
        assert asyncio.get_running_loop().time() - started < 1.0
        assert not inflight.done()
        assert await served_by(two, a, b) == "b"  # 200 from the new one, during the drain
        key = await two.post("/api/v1/keys", json={"name": "during"}, headers=ADMIN)
        assert key.status_code == 201, key.text  # admin calls are not held by the lock
        assert not inflight.done()
        finished = await asyncio.wait_for(inflight, 10)
        assert finished.status_code == 200, finished.text  # finished on the old provider
        await asyncio.wait_for(app_two.state.provider_sync.close(), 5)
        assert not app_two.state.provider_sync._draining
