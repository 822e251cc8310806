"""Wrong admin secrets are throttled per client address (docs/security.md)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import httpx
import pytest
from fastapi import FastAPI

from embedplex.backends.fake import FakeBackend
from embedplex.limits import FailureThrottle
from embedplex.limits.failures import BURST
from helpers import fake_app

SECRET = "throttle-admin-secret"
WRONG = "wrong-guess-of-the-secret"


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@asynccontextmanager
async def clients(app: FastAPI) -> AsyncIterator[tuple[httpx.AsyncClient, httpx.AsyncClient]]:
    """Two clients of the app at two addresses: a guesser and an administrator."""
    async with app.router.lifespan_context(app):
        await asyncio.wait_for(asyncio.shield(app.state.loader), 120)
        guesser = httpx.ASGITransport(app=app, client=("203.0.113.9", 40000))
        admin = httpx.ASGITransport(app=app, client=("198.51.100.7", 40001))
        async with (
            httpx.AsyncClient(transport=guesser, base_url="http://test") as a,
            httpx.AsyncClient(transport=admin, base_url="http://test") as b,
        ):
            yield a, b


def bearer(secret: str) -> dict[str, str]:
    return {"authorization": f"Bearer {secret}"}


async def test_a_flood_of_wrong_secrets_is_throttled_per_address_and_lifts(
    tiny_model_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    app = fake_app(tiny_model_dir, FakeBackend(), admin_secret=SECRET)
    clock = Clock()
    app.state.admin_failures = FailureThrottle(clock=clock)
    caplog.set_level(logging.INFO)
    async with clients(app) as (guesser, admin):
        # Correct secrets are never counted, however many.
        for _ in range(BURST + 2):
            assert (await guesser.get("/api/v1/status", headers=bearer(SECRET))).status_code == 200
        wrong = [
            (await guesser.get("/api/v1/status", headers=bearer(WRONG))).status_code
            for _ in range(BURST)
        ]
        # Throttled on every admin route (a FastAPI dependency and a JSON route's guard),
        # the correct secret included: that answer would tell a guesser it had guessed right.
        throttled = [
            await guesser.get("/api/v1/status", headers=bearer(WRONG)),
            await guesser.get("/api/v1/status", headers=bearer(SECRET)),
            await guesser.post("/api/v1/providers", json={}, headers={"x-admin-secret": SECRET}),
        ]
        # Meanwhile an administrator elsewhere is let in, and its own typo is only a 401.
        elsewhere = await admin.get("/api/v1/status", headers=bearer(SECRET))
        typo = await admin.get("/api/v1/status", headers=bearer(WRONG))
        clock.now += 60.0 / BURST  # one failure has drained
        lifted = await guesser.get("/api/v1/status", headers=bearer(SECRET))
        # The data plane is not the admin API: never throttled by it.
        embed = await guesser.post("/v1/embeddings", json={"input": "hi"})
    assert wrong == [401] * BURST
    for answer in throttled:
        assert answer.status_code == 429, answer.text
        assert answer.headers["retry-after"] == str(round(60.0 / BURST))
        assert "too many wrong admin secrets" in answer.text
        assert SECRET not in answer.text
    assert elsewhere.status_code == 200
    assert typo.status_code == 401
    assert lifted.status_code == 200
    assert embed.status_code == 200
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len([w for w in warnings if "too many wrong admin secrets" in w]) == 1
    assert any("203.0.113.9" in w for w in warnings)
    logged = " ".join(r.getMessage() for r in caplog.records)
    assert WRONG not in logged and SECRET not in logged


async def test_requests_without_a_secret_are_refused_but_not_counted(tiny_model_dir: Path) -> None:
    """A monitor polling without a secret is no guesser: it must not lock its address out."""
    app = fake_app(tiny_model_dir, FakeBackend(), admin_secret=SECRET)
    async with clients(app) as (monitor, _):
        for _ in range(BURST * 3):
            assert (await monitor.get("/api/v1/status")).status_code == 401
        assert (await monitor.get("/api/v1/status", headers=bearer(SECRET))).status_code == 200


def test_ipv6_addresses_of_one_64_share_a_bucket() -> None:
    from embedplex.api.routes.admin import _counted_as

    assert _counted_as("2001:db8:1:2::1") == _counted_as("2001:db8:1:2:ffff::9")
    assert _counted_as("2001:db8:1:2::1") != _counted_as("2001:db8:1:3::1")
    assert _counted_as("203.0.113.9") == "203.0.113.9"
    assert _counted_as("not:an:address") == "not:an:address"
