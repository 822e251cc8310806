"""Usage flushes are added exactly once: a write the store committed but never confirmed (the
answer lost, the driver's timeout) is retried under its flush id and not added again; a write
that failed before committing is added by the retry; a store down for several flushes leaves
one pending batch, and everything is added once when it answers; the 0002 migration brings
an existing store the claims table, and old claims are deleted."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from datetime import timedelta
from typing import Any

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import Connection, insert, select, text

from embedplex.state import schema, usage
from embedplex.state.store import MIGRATIONS, StateStore, now
from embedplex.state.usage import PRUNE_EVERY_S, UsageMeter, usage_since
from pg_proxy import pg_proxy
from state_fixtures import pg_url, state_url  # noqa: F401  (fixtures)

Write = Callable[..., Awaitable[Any]]


def failing(real: Write, times: int, *, after_commit: bool, seen: list[Any]) -> Write:
    """``real`` (the meter's write) failing its next ``times`` calls with the driver's
    TimeoutError: after it committed (the answer was lost) or before it ran (a rollback)."""
    left = [times]

    async def write(*args: Any) -> Any:
        seen.append(args)
        if left[0] <= 0:
            return await real(*args)
        left[0] -= 1
        if after_commit:
            await real(*args)
        raise TimeoutError

    return write


def add(meter: UsageMeter, n: int, *, key: str = "k1") -> None:
    for _ in range(n):
        meter.add(key, 2, 3, refused=False)


async def totals(store: StateStore) -> list[tuple[str, int, int, int]]:
    return [(t.key_id, t.requests, t.inputs, t.tokens) for t in await usage_since(store, None)]


@pytest.mark.parametrize("then", ["flush", "close"])
async def test_a_flush_committed_but_unconfirmed_is_not_added_again(
    state_url: str,  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
    then: str,
) -> None:
    """Then the next flush, or the shutdown's, retries it and finds its id claimed."""
    async with StateStore.from_url(state_url) as store:
        meter = UsageMeter(store, flush_s=3600)
        monkeypatch.setattr(meter, "_write", failing(meter._write, 1, after_commit=True, seen=[]))
        add(meter, 10)
        await meter.flush()  # committed; the meter was told TimeoutError
        assert await totals(store) == [("k1", 10, 20, 30)]
        add(meter, 3)
        await (meter.flush() if then == "flush" else meter.close())
        assert await totals(store) == [("k1", 13, 26, 39)]  # the old retry made it 23


async def test_a_commit_whose_answer_postgresql_never_sent_is_not_added_again(
    pg_url: str,  # noqa: F811
) -> None:
    """The real case: the COMMIT reaches PostgreSQL, then the link goes silent; asyncpg's
    command timeout fails the write (outcome unknown), the next flush retries it; two more
    flushes while the store stays silent, then it answers again."""
    with pg_proxy(pg_url) as proxy:
        store = StateStore.from_url(proxy.url(pg_url), timeout_s=0.5)
        await asyncio.wait_for(store.upgrade(), 30)
        meter = UsageMeter(store, flush_s=3600)
        add(meter, 10)
        proxy.hang_after = b"COMMIT"
        await asyncio.wait_for(meter.flush(), 10)
        assert proxy.mode == "hang" and meter._pending is not None
        for more in (4, 5):  # the store silent: the pending batch is retried, the rest waits
            add(meter, more)
            await asyncio.wait_for(meter.flush(), 10)
        proxy.mode = "pass"
        await asyncio.wait_for(meter.flush(), 20)
        await asyncio.wait_for(meter.close(), 20)
        await store.close()
    async with StateStore.from_url(pg_url) as direct:
        assert await totals(direct) == [("k1", 19, 38, 57)]  # the old retry made it 29


async def test_a_flush_that_failed_before_committing_is_added_by_the_next(
    state_url: str,  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The claim is rolled back with the upserts of a failed transaction: committed on its
    own, it would make the retry skip counts that were never added."""
    async with StateStore.from_url(state_url) as store:
        meter = UsageMeter(store, flush_s=3600)
        real = usage._upsert
        calls = [0]

        def upsert_failing_once(*args: Any) -> Any:
            calls[0] += 1
            if calls[0] == 1:  # inside the transaction, after the claim
                raise ConnectionResetError("the connection went away")
            return real(*args)

        monkeypatch.setattr(usage, "_upsert", upsert_failing_once)
        add(meter, 6)
        await meter.flush()
        assert await totals(store) == []
        add(meter, 2, key="k2")
        add(meter, 1)
        await meter.flush()
        assert await totals(store) == [("k1", 7, 14, 21), ("k2", 2, 4, 6)]
        assert meter._pending is None and meter._counts == {}


async def test_a_store_down_for_several_flushes_keeps_one_pending_batch(
    state_url: str,  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    async with StateStore.from_url(state_url) as store:
        meter = UsageMeter(store, flush_s=3600)
        seen: list[Any] = []
        monkeypatch.setattr(
            meter, "_write", failing(meter._write, 3, after_commit=False, seen=seen)
        )
        add(meter, 5)
        for flush in range(3):  # down: one write a flush, always the first batch again
            await meter.flush()
            add(meter, 1, key=f"k{flush + 2}")
        assert len(seen) == 3 and len({id(args[0]) for args in seen}) == 1
        first = seen[0][0]
        assert meter._pending is first and first.requests() == 5
        # the counts since wait in memory (one entry per key and minute), not in the batch
        assert {key for key, _ in meter._counts} == {"k2", "k3", "k4"}
        await meter.flush()  # back: the pending batch, then the rest as a new one
        assert len(seen) == 5 and seen[4][0].id != first.id
        assert meter._pending is None and meter._counts == {}
        assert await totals(store) == [
            ("k1", 5, 10, 15),
            ("k2", 1, 2, 3),
            ("k3", 1, 2, 3),
            ("k4", 1, 2, 3),
        ]


def _migrate_to(conn: Connection, revision: str) -> None:
    from alembic import command
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    config.attributes["connection"] = conn
    command.upgrade(config, revision)


async def test_a_0001_store_is_upgraded_and_old_claims_are_deleted(
    state_url: str,  # noqa: F811
) -> None:
    old = StateStore.from_url(state_url)
    async with old.engine.begin() as conn:
        if old.target.schema:
            await conn.execute(text(f'CREATE SCHEMA "{old.target.schema}"'))
        await conn.run_sync(_migrate_to, "0001")
        await conn.execute(
            insert(schema.usage).values(
                key_id="k1",
                bucket=now().replace(second=0, microsecond=0),
                requests=7,
                inputs=7,
                tokens=7,
                refusals=0,
            )
        )
    await old.close()

    async with StateStore.from_url(state_url) as store:  # the new release starts: 0002
        async with store.engine.connect() as conn:
            assert await conn.scalar(text("SELECT version_num FROM alembic_version")) == "0002"
            drift = await conn.run_sync(
                lambda c: compare_metadata(MigrationContext.configure(c), schema.metadata)
            )
        assert [d for d in drift if "usage_flushes" in str(d)] == []  # 0002 == schema.py
        assert [t.requests for t in await usage_since(store, None)] == [7]
        claims = schema.usage_flushes
        stamp = now()
        async with store.engine.begin() as conn:
            await conn.execute(
                insert(claims),
                [
                    {"id": "a" * 32, "at": stamp - timedelta(days=8)},
                    {"id": "b" * 32, "at": stamp - timedelta(days=6)},
                ],
            )

        async def ids() -> set[str]:
            async with store.engine.connect() as conn:
                return set((await conn.scalars(select(claims.c.id))).all())

        meter = UsageMeter(store, flush_s=3600)
        add(meter, 3)
        await meter.flush()  # the first flush deletes claims past a week
        found = await ids()
        assert "a" * 32 not in found and "b" * 32 in found and len(found) == 2
        assert [t.requests for t in await usage_since(store, None)] == [10]

        async with store.engine.begin() as conn:
            await conn.execute(insert(claims).values(id="c" * 32, at=stamp - timedelta(days=9)))
        add(meter, 1)
        await meter.flush()
        assert "c" * 32 in await ids()  # at most one delete an hour
        meter._prune_at = time.monotonic() - PRUNE_EVERY_S  # an hour on
        add(meter, 1)
        await meter.flush()
        assert "c" * 32 not in await ids() and len(await ids()) == 4
