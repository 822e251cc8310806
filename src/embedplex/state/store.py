"""``StateStore``: the engine, the schema's migrations and the change counter.

Construction does no I/O; ``upgrade()`` applies the migrations (idempotent, safe when several
replicas start at once: on PostgreSQL under an advisory lock), ``close()`` disposes the pool.
The key and usage operations live in ``keys.py`` and ``usage.py`` and reach the database
through ``store.engine``.
"""

from __future__ import annotations

import asyncio
import logging
import weakref
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

from sqlalchemy import select, text, update
from sqlalchemy.engine import Connection
from sqlalchemy.exc import OperationalError, SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine

from embedplex.state import schema
from embedplex.state.url import StateUrl, resolve

if TYPE_CHECKING:
    from embedplex.config import Settings

logger = logging.getLogger(__name__)

MIGRATIONS = Path(__file__).parent / "migrations"
_UPGRADING: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, asyncio.Lock] = (
    weakref.WeakKeyDictionary()
)
T = TypeVar("T")

_LOCK_ID = 0x656D6270  # "embp": one advisory lock id for the migrations of every schema


def utc(value: datetime | None) -> datetime | None:
    """A timestamp read back as aware UTC (SQLite hands back naive ones)."""
    if value is None or value.tzinfo is not None:
        return value
    return value.replace(tzinfo=UTC)


def now() -> datetime:
    return datetime.now(UTC)


class StoreOpenError(Exception):
    """The store could not be opened: the message names it (password hidden) and why."""


async def open_store(settings: Settings, work: Callable[[StateStore], Awaitable[T]]) -> T:
    """Open the settings' store, run ``work`` on it, close it; a directory that cannot be
    made, a database that does not answer or refuses becomes one ``StoreOpenError`` line
    (the CLI and serve print it and exit 2) instead of a driver's traceback."""
    try:
        store = StateStore.from_settings(settings)
    except OSError as exc:
        where = exc.filename or settings.data_dir
        raise StoreOpenError(f"cannot create the state store in {where}: {_why(exc)}") from None
    try:
        async with store:
            return await work(store)
    except (OSError, SQLAlchemyError, TimeoutError) as exc:
        raise StoreOpenError(
            f"cannot open the state store {store.describe()}: {_why(exc)}"
        ) from None


def _why(exc: BaseException) -> str:
    """The driver's own first line (no SQL, no parameters: the engine hides those)."""
    cause = getattr(exc, "orig", None) or exc
    if isinstance(cause, OSError) and cause.strerror:
        return cause.strerror
    text = str(cause).strip().splitlines()
    return text[0] if text and text[0] else type(cause).__name__


class StateStore:
    """One state database; ``from_settings`` or ``from_url`` build it, ``upgrade`` readies it."""

    def __init__(self, target: StateUrl) -> None:
        self.target = target
        self.engine: AsyncEngine = create_async_engine(
            target.url,
            connect_args=target.connect_args,
            pool_pre_ping=True,
            # A failed statement's error message must not carry its parameters into the logs:
            # a key's argon2 hash is one of them (docs/security.md).
            hide_parameters=True,
        )

    @classmethod
    def from_url(cls, state_url: str | None, data_dir: Path | None = None) -> StateStore:
        return cls(resolve(state_url, data_dir))

    @classmethod
    def from_settings(cls, settings: Settings) -> StateStore:
        return cls.from_url(settings.state_url, settings.data_dir)

    def describe(self) -> str:
        return self.target.display()

    async def upgrade(self) -> None:
        """Apply every migration not yet applied (``embedplex db upgrade``; also on start)."""
        # Alembic keeps its migration context in a module global: one upgrade at a time here.
        loop = asyncio.get_running_loop()
        lock = _UPGRADING.setdefault(loop, asyncio.Lock())
        async with lock:
            await self._upgrade()

    async def _upgrade(self) -> None:
        if self.target.is_sqlite:
            # SQLite runs DDL outside the driver's transaction, so two processes migrating a
            # new file at once can race; the loser's retry finds the schema at head.
            for attempt in range(3):
                try:
                    async with self.engine.begin() as conn:
                        await conn.run_sync(_upgrade)
                    return
                except OperationalError:
                    if attempt == 2:
                        raise
                    await asyncio.sleep(0.2 * (attempt + 1))
        async with self.engine.begin() as conn:
            if not self.target.is_sqlite:
                await conn.execute(text("SELECT pg_advisory_xact_lock(:id)"), {"id": _LOCK_ID})
                if self.target.schema:
                    await conn.execute(
                        text(f'CREATE SCHEMA IF NOT EXISTS "{_quoted(self.target.schema)}"')
                    )
            await conn.run_sync(_upgrade)

    async def close(self) -> None:
        await self.engine.dispose()

    async def version(self) -> int:
        """The change counter: it moves whenever a key or a stored provider changes."""
        async with self.engine.connect() as conn:
            value = await conn.scalar(select(schema.state_version.c.version))
        return int(value or 0)

    async def __aenter__(self) -> StateStore:
        await self.upgrade()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


async def bump(conn: AsyncConnection) -> None:
    """Increment the change counter inside the caller's transaction."""
    table = schema.state_version
    await conn.execute(update(table).values(version=table.c.version + 1))


def _quoted(name: str) -> str:
    if not name.replace("_", "").isalnum():
        raise ValueError(f"schema name {name!r}: letters, digits and _ only")
    return name


def _upgrade(conn: Connection) -> None:
    from alembic import command
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    config.attributes["connection"] = conn
    command.upgrade(config, "head")
