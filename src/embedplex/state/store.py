"""``StateStore``: the engine, the schema's migrations and the change counter.

Construction does no I/O; ``upgrade()`` applies the migrations (idempotent, safe when several
replicas start at once: on PostgreSQL under an advisory lock), ``close()`` disposes the pool.
The key and usage operations live in ``keys.py`` and ``usage.py`` and reach the database
through ``store.engine``.

A store that stops answering (a frozen host, a partition: connections stay open, no bytes
come back) must fail, not hang: ``timeout_s`` (``state_timeout_s``) bounds connecting, each
statement (asyncpg's ``command_timeout``) and a wait for a pooled connection, and the server's
calls go through ``bounded()``, which answers ``TimeoutError`` after ``timeout_s`` however the
driver is stuck.
"""

from __future__ import annotations

import asyncio
import logging
import weakref
from collections.abc import Awaitable, Callable, Coroutine
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from sqlalchemy import select, text, update
from sqlalchemy.engine import Connection
from sqlalchemy.exc import OperationalError, SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine

from embedplex.state import schema
from embedplex.state.url import DEFAULT_TIMEOUT_S, StateUrl, resolve

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


# What a store that fails or does not answer raises: the driver's errors, the network's, and
# ``bounded``'s TimeoutError.
STORE_ERRORS = (SQLAlchemyError, OSError, TimeoutError)


def sqlite_busy_s(timeout_s: float) -> float:
    """SQLite's busy timeout for a ``state_timeout_s``: 30 s at most, and below the bound."""
    return min(30.0, 0.8 * timeout_s)


class StoreOpenError(Exception):
    """The store could not be opened: the message names it (password hidden) and why."""


class StoreNewerError(Exception):
    """The store's schema is at a revision this release does not know (a newer one's)."""

    def __init__(self, found: str, head: str | None) -> None:
        super().__init__(found)
        self.found = found
        self.head = head


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
    except STORE_ERRORS as exc:
        raise StoreOpenError(
            f"cannot open the state store {store.describe()}: {_why(exc)}"
        ) from None
    except StoreNewerError as exc:
        raise StoreOpenError(
            f"the state store {store.describe()} is at schema revision {exc.found}, newer than "
            f"this release's {exc.head}: upgrade embedplex to the release that migrated it "
            "(or point state_url at a store of this release)"
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

    def __init__(self, target: StateUrl, *, timeout_s: float = DEFAULT_TIMEOUT_S) -> None:
        self.target = target
        self.timeout_s = timeout_s
        options: dict[str, Any] = {"connect_args": dict(target.connect_args)}
        if target.is_sqlite:
            # SQLite's busy timeout (a wait for another connection's lock) ends before the
            # bound: the driver then fails and rolls back, so ``bounded`` does not give up on
            # a write that goes on and commits after its caller was told it failed.
            options["connect_args"]["timeout"] = sqlite_busy_s(timeout_s)
        else:
            # asyncpg: ``timeout`` bounds connecting, ``command_timeout`` each statement (and
            # the pool's ping, rollback and close, which run outside any caller's bound).
            options["connect_args"].update(timeout=timeout_s, command_timeout=timeout_s)
            options["pool_timeout"] = timeout_s  # a wait for a free pooled connection
        self.engine: AsyncEngine = create_async_engine(
            target.url,
            **options,
            pool_pre_ping=True,
            # A failed statement's error message must not carry its parameters into the logs:
            # a key's argon2 hash is one of them (docs/security.md).
            hide_parameters=True,
        )
        # Work ``bounded`` gave up on, still unwinding (its connection's cleanup).
        self._abandoned: set[asyncio.Future[Any]] = set()

    @classmethod
    def from_url(
        cls,
        state_url: str | None,
        data_dir: Path | None = None,
        *,
        timeout_s: float = DEFAULT_TIMEOUT_S,
    ) -> StateStore:
        return cls(resolve(state_url, data_dir), timeout_s=timeout_s)

    @classmethod
    def from_settings(cls, settings: Settings) -> StateStore:
        return cls.from_url(
            settings.state_url, settings.data_dir, timeout_s=settings.state_timeout_s
        )

    async def bounded(self, work: Coroutine[Any, Any, T]) -> T:
        """``work`` (one use of the store), or ``TimeoutError`` once ``timeout_s`` has passed.

        The work runs as its own task and the caller waits for it shielded: past the bound the
        caller gets its answer at once and the work is cancelled behind it, so a stuck
        connection's cleanup (bounded by the driver's timeouts) never adds to the caller's
        wait. A caller cancelled (a client gone) cancels the work too.
        """
        task = asyncio.ensure_future(work)
        try:
            async with asyncio.timeout(self.timeout_s):
                return await asyncio.shield(task)
        except BaseException:
            if not task.done():
                task.cancel()
                self._abandoned.add(task)
                task.add_done_callback(self._unwound)
            raise

    def _unwound(self, task: asyncio.Future[Any]) -> None:
        self._abandoned.discard(task)
        if not task.cancelled():
            task.exception()  # retrieved: its caller has had its answer

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
                    await _create_schema(conn, self.target.schema)
            await conn.run_sync(_upgrade)

    async def close(self) -> None:
        """Dispose the pool; bounded, so a store that stopped answering cannot hold up a
        shutdown (each connection's close is bounded by ``command_timeout`` as well)."""
        if self._abandoned:
            await asyncio.wait(self._abandoned, timeout=self.timeout_s)
        try:
            async with asyncio.timeout(2 * self.timeout_s):
                await self.engine.dispose()
        except TimeoutError:
            logger.warning("closing the state store's connections timed out; dropped")

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


async def _create_schema(conn: AsyncConnection, name: str) -> None:
    """Create the ``?schema=`` schema when it is missing, and only then: CREATE SCHEMA needs
    the CREATE privilege on the database even with IF NOT EXISTS, which a least-privilege role
    (USAGE on its schema, DML on the tables) does not hold."""
    found = await conn.scalar(
        text("SELECT 1 FROM pg_namespace WHERE nspname = :name"), {"name": name}
    )
    if found is None:
        await conn.execute(text(f'CREATE SCHEMA IF NOT EXISTS "{_quoted(name)}"'))


def _upgrade(conn: Connection) -> None:
    """Migrate to head. A store already there is left alone: reading ``alembic_version`` is
    all it takes (no DDL privilege). A revision this release does not know (a newer release
    migrated the store) is ``StoreNewerError``, not Alembic's traceback."""
    from alembic import command
    from alembic.config import Config
    from alembic.runtime.migration import MigrationContext
    from alembic.script import ScriptDirectory

    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    config.attributes["connection"] = conn
    script = ScriptDirectory.from_config(config)
    current = set(MigrationContext.configure(conn).get_current_heads())
    known = {revision.revision for revision in script.walk_revisions()}
    newer = sorted(current - known)
    if newer:
        raise StoreNewerError(newer[0], script.get_current_head())
    if current == set(script.get_heads()):
        return
    command.upgrade(config, "head")
