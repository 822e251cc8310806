"""From the ``state_url`` setting to an async SQLAlchemy URL and engine options.

SQLite URLs use the ``aiosqlite`` driver, PostgreSQL URLs ``asyncpg``: the driver SQLAlchemy's
async PostgreSQL support is built and tested around first, the fastest of the two, and shipped
as wheels that need no libpq on the host (psycopg 3 needs libpq or its binary extra).
PostgreSQL URLs may carry ``?schema=name``: tables then live in that schema (created if
missing), so several deployments, or parallel test runs, can share one database.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import ArgumentError

# Where they lived first (imported from here still); the hub child needs them without SQLAlchemy.
from embedplex.core.redact import MASK as MASK
from embedplex.core.redact import redact_url as redact_url
from embedplex.core.redact import redact_urls as redact_urls

STATE_FILE = "state.db"
# state_timeout_s's default: a store call unanswered this long fails (store.py). Well above a
# healthy store's milliseconds, well below a client's patience.
DEFAULT_TIMEOUT_S = 5.0


def default_data_dir() -> Path:
    """``$XDG_DATA_HOME/embedplex``, else ``~/.local/share/embedplex``."""
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base) / "embedplex"


@dataclass(frozen=True, slots=True)
class StateUrl:
    """The engine URL, the PostgreSQL schema (if any) and the connect arguments."""

    url: URL
    schema: str | None = None
    connect_args: dict[str, Any] = field(default_factory=dict)

    @property
    def is_sqlite(self) -> bool:
        return self.url.get_backend_name() == "sqlite"

    def display(self) -> str:
        """The URL with any password hidden, and its ``?schema=`` (taken off the engine's URL):
        safe for logs and the CLI, and two schemas of one database are told apart."""
        shown = redact_url(self.url.render_as_string(hide_password=False))
        if self.schema:
            shown += f"{'&' if self.url.query else '?'}schema={self.schema}"
        return shown


def parse_state_url(state_url: str) -> URL:
    """``state_url`` parsed and checked (settings call it, so a bad one stops at load with a
    clear message, its password hidden): a URL, SQLite or PostgreSQL, a plain schema name."""
    try:
        url = make_url(state_url)
    except ArgumentError:
        raise ValueError(
            f"state_url {redact_url(state_url)!r} is not a URL "
            "(sqlite:///path/state.db or postgresql://user@host/db)"
        ) from None
    backend = url.get_backend_name()
    if backend not in ("sqlite", "postgresql", "postgres"):
        raise ValueError(f"state_url must be sqlite:/// or postgresql:// (got {backend!r})")
    schema = _schema(url)
    if schema and not schema.replace("_", "").isalnum():
        raise ValueError(f"state_url schema {schema!r}: letters, digits and _ only")
    return url


def _schema(url: URL) -> str | None:
    schema = url.query.get("schema")
    return schema[-1] if isinstance(schema, tuple) else schema


def resolve(state_url: str | None, data_dir: Path | None = None) -> StateUrl:
    """``state_url`` as an async engine URL; None: SQLite in ``data_dir`` (created)."""
    if state_url is None:
        directory = data_dir or default_data_dir()
        directory.mkdir(parents=True, exist_ok=True)
        state_url = f"sqlite:///{directory / STATE_FILE}"
    url = parse_state_url(state_url)
    if url.get_backend_name() == "sqlite":
        if url.database and url.database != ":memory:":
            Path(url.database).expanduser().parent.mkdir(parents=True, exist_ok=True)
        # Writers wait for each other instead of failing at once (the CLI beside a server);
        # StateStore shortens the wait below state_timeout_s (``sqlite_busy_s``).
        return StateUrl(url.set(drivername="sqlite+aiosqlite"), connect_args={"timeout": 30})
    schema = _schema(url)
    url = url.set(drivername="postgresql+asyncpg").difference_update_query(["schema"])
    args: dict[str, Any] = {}
    if schema:
        # Quoted, as CREATE SCHEMA quotes it (store.py): unquoted, PostgreSQL would fold a
        # name with capitals to lower case and look in a schema that does not exist.
        args["server_settings"] = {"search_path": f'"{schema}"'}
    return StateUrl(url, schema or None, args)
