"""Opening the store: a least-privilege role on an existing schema, a store a newer release
migrated, and the line that says which store a command used (its schema included)."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import text
from typer.testing import CliRunner

from embedplex.cli.main import app
from embedplex.config import Settings
from embedplex.serve.server import StartupError, check_start
from embedplex.state.keys import KeySpec, KeyStore
from embedplex.state.store import StateStore
from embedplex.state.url import resolve
from state_fixtures import (
    PG_BASE,
    _pg,
    pg_url,  # noqa: F401  (fixture)
)


def cli(*args: str, url: str) -> tuple[int, str]:
    result = CliRunner().invoke(app, list(args), env={"EMBEDPLEX_STATE_URL": url})
    return result.exit_code, result.output


@pytest.fixture
def least_privilege_url(pg_url: str) -> Iterator[str]:  # noqa: F811
    """``pg_url``'s schema, migrated by its owner, reached as a role that may use the schema
    and read and write its tables, and nothing else (no CREATE on the database)."""
    schema = pg_url.rsplit("=", 1)[1]
    role = f"r_{uuid.uuid4().hex[:12]}"

    async def migrate() -> None:
        async with StateStore.from_url(pg_url) as store:
            await KeyStore(store).create(KeySpec(name="made-by-the-owner"))

    asyncio.run(migrate())
    asyncio.run(_pg(f'CREATE ROLE "{role}" LOGIN'))
    try:
        asyncio.run(
            _pg(
                f'GRANT USAGE ON SCHEMA "{schema}" TO "{role}"; '
                f'GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA "{schema}" '
                f'TO "{role}"'
            )
        )
        yield pg_url.replace("://postgres@", f"://{role}@", 1)
    finally:
        asyncio.run(_pg(f'DROP OWNED BY "{role}"; DROP ROLE "{role}"'))


def test_a_role_without_create_uses_an_existing_schema(least_privilege_url: str) -> None:
    """CREATE SCHEMA IF NOT EXISTS ran on every open, and PostgreSQL checks the database's
    CREATE privilege before IF NOT EXISTS: such a role could not list keys nor serve."""
    code, out = cli("keys", "list", "--json", url=least_privilege_url)
    assert code == 0, out
    assert [k["name"] for k in json.loads(out)] == ["made-by-the-owner"]
    code, out = cli("keys", "create", "--name", "by-the-role", url=least_privilege_url)
    assert code == 0, out
    assert check_start(Settings(state_url=least_privilege_url)) is None  # serve's open


@pytest.fixture
def newer_store(tmp_path: Path) -> str:
    """A store whose schema a later release migrated (a revision this one does not ship)."""
    url = f"sqlite:///{tmp_path / 'state.db'}"

    async def migrate() -> None:
        async with StateStore.from_url(url) as store, store.engine.begin() as conn:
            await conn.execute(text("UPDATE alembic_version SET version_num = '0003'"))

    asyncio.run(migrate())
    return url


def test_a_store_migrated_by_a_newer_release_is_one_clear_line(newer_store: str) -> None:
    for args in (("keys", "list"), ("db", "upgrade")):
        code, out = cli(*args, url=newer_store)
        assert code == 2, out
        assert "Traceback" not in out and len(out.strip().splitlines()) == 1, out
        assert "schema revision 0003, newer than this release's 0002" in out
        assert "upgrade embedplex" in out
    with pytest.raises(StartupError, match="newer than this release's 0002"):
        check_start(Settings(state_url=newer_store))


def test_the_store_line_names_the_schema() -> None:
    shown = resolve("postgresql://u:pw@h/db?schema=two").display()
    assert shown == "postgresql+asyncpg://u:***@h/db?schema=two"
    other = resolve("postgresql://u@h/db?sslmode=require&schema=Other").display()
    assert other == "postgresql+asyncpg://u@h/db?sslmode=require&schema=Other"
    assert resolve("postgresql://u@h/db").display() == "postgresql+asyncpg://u@h/db"


def test_keys_list_on_two_schemas_names_two_stores(pg_url: str) -> None:  # noqa: F811
    other = f"t_{uuid.uuid4().hex[:16]}"
    try:
        lines = set()
        for url in (pg_url, f"{PG_BASE}?schema={other}"):
            code, out = cli("keys", "list", url=url)
            assert code == 0, out
            lines.add(next(line for line in out.splitlines() if line.startswith("state store:")))
        assert lines == {
            f"state store: {resolve(pg_url).display()}",
            f"state store: {resolve(PG_BASE).display()}?schema={other}",
        }
    finally:
        asyncio.run(_pg(f'DROP SCHEMA IF EXISTS "{other}" CASCADE'))
