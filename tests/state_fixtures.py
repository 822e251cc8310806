"""State-store URLs for tests: a fresh SQLite file, or a fresh schema on the real PostgreSQL.

PostgreSQL is the one at 127.0.0.1:5432 (database ``test``; CI starts it). Each test gets its
own schema (``?schema=``, dropped afterwards), so parallel runs do not collide; when the server
is down the PostgreSQL cases skip, saying so.
"""

from __future__ import annotations

import asyncio
import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

PG_BASE = os.environ.get("EMBEDPLEX_TEST_PG", "postgresql://postgres@127.0.0.1:5432/test")


def _pg_dsn() -> str:
    return PG_BASE.replace("postgresql+asyncpg://", "postgresql://")


async def _pg(sql: str) -> None:
    import asyncpg

    conn = await asyncio.wait_for(asyncpg.connect(_pg_dsn()), 3)
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


def pg_available() -> str | None:
    """None when PostgreSQL answers, else why not."""
    try:
        asyncio.run(_pg("SELECT 1"))
    except Exception as exc:
        return f"PostgreSQL at {PG_BASE} is not reachable ({type(exc).__name__}); CI runs it"
    return None


@pytest.fixture
def pg_url() -> Iterator[str]:
    reason = pg_available()
    if reason is not None:
        pytest.skip(reason)
    schema = f"t_{uuid.uuid4().hex[:16]}"
    try:
        yield f"{PG_BASE}?schema={schema}"
    finally:
        asyncio.run(_pg(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE'))


@pytest.fixture(params=["sqlite", "postgresql"])
def state_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'state.db'}"
    url: str = request.getfixturevalue("pg_url")
    return url
