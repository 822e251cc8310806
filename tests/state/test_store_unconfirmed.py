"""Store writes whose outcome the caller is told: a SQLite lock outlasting ``state_timeout_s``
is the driver's failure (a rollback) before the bound, not a write abandoned at the bound that
commits later (usage counted twice, a key created behind a 503); an admin change the store
does not confirm in time is a 503 that says it may have been applied."""

from __future__ import annotations

import asyncio
import sqlite3
import threading
import time
from pathlib import Path

import pytest

from embedplex.api.app import create_app
from embedplex.api.routes.admin import from_store
from embedplex.core.errors import UnavailableError
from embedplex.state.store import StateStore
from embedplex.state.usage import UsageMeter, usage_since
from gateways import ADMIN, gateway_settings
from helpers import running
from upstream_fakes import running_upstream

BOUND_S = 1.0


def hold_read_lock(path: Path, seconds: float) -> threading.Thread:
    """Another connection (a backup, ``embedplex keys usage``) in a read transaction: a
    writer's COMMIT waits for it."""

    def reader() -> None:
        conn = sqlite3.connect(path, isolation_level=None)
        conn.execute("BEGIN")
        conn.execute("SELECT count(*) FROM api_keys").fetchall()
        time.sleep(seconds)
        conn.execute("COMMIT")
        conn.close()

    thread = threading.Thread(target=reader)
    thread.start()
    return thread


async def test_a_usage_flush_outlasted_by_a_sqlite_reader_is_counted_once(tmp_path: Path) -> None:
    path = tmp_path / "state.db"
    store = StateStore.from_url(f"sqlite:///{path}", timeout_s=BOUND_S)
    await store.upgrade()
    meter = UsageMeter(store, flush_s=3600)
    for _ in range(10):
        meter.add("k1", 1, 1, refused=False)
    reader = hold_read_lock(path, 2 * BOUND_S)
    await asyncio.sleep(0.2)
    await meter.flush()  # the reader holds the lock past the busy timeout: kept, not written
    await asyncio.to_thread(reader.join)
    await asyncio.sleep(0.5)  # (a write abandoned at the bound committed by now)
    await meter.flush()
    await store.close()
    async with StateStore.from_url(f"sqlite:///{path}") as direct:
        totals = await usage_since(direct, None)
    assert [t.requests for t in totals] == [10]


async def test_a_key_create_outlasted_by_a_sqlite_reader_is_a_503_that_stored_nothing(
    tmp_path: Path,
) -> None:
    path = tmp_path / "state.db"
    with running_upstream() as up:
        app = create_app(gateway_settings(f"sqlite:///{path}", up, state_timeout_s=BOUND_S))
        async with running(app) as client:
            reader = hold_read_lock(path, 2 * BOUND_S)
            await asyncio.sleep(0.2)
            r = await client.post("/api/v1/keys", json={"name": "ci-bot"}, headers=ADMIN)
            assert r.status_code == 503, r.text
            assert "state store is unavailable" in r.text
            await asyncio.to_thread(reader.join)
            await asyncio.sleep(0.5)
            listed = await client.get("/api/v1/keys", headers=ADMIN)
            assert listed.status_code == 200, listed.text
            assert listed.json()["data"] == []  # the driver rolled back: safe to retry
            r = await client.post("/api/v1/keys", json={"name": "ci-bot"}, headers=ADMIN)
            assert r.status_code == 201, r.text


async def test_a_change_not_confirmed_within_the_bound_says_it_may_have_been_made(
    tmp_path: Path,
) -> None:
    async with StateStore.from_url(f"sqlite:///{tmp_path / 'state.db'}", timeout_s=0.2) as store:
        with pytest.raises(UnavailableError) as change:
            await from_store(store, asyncio.sleep(1), change=True)
        assert "may have been applied; check (GET) before retrying" in change.value.message
        with pytest.raises(UnavailableError) as read:  # a read: nothing to check
            await from_store(store, asyncio.sleep(1))
        assert "may have been applied" not in read.value.message
