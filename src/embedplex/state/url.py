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

STATE_FILE = "state.db"


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
        """The URL with any password hidden: safe for logs and the CLI."""
        return self.url.render_as_string(hide_password=True)


def resolve(state_url: str | None, data_dir: Path | None = None) -> StateUrl:
    """``state_url`` as an async engine URL; None: SQLite in ``data_dir`` (created)."""
    if state_url is None:
        directory = data_dir or default_data_dir()
        directory.mkdir(parents=True, exist_ok=True)
        state_url = f"sqlite:///{directory / STATE_FILE}"
    url = make_url(state_url)
    backend = url.get_backend_name()
    if backend == "sqlite":
        if url.database and url.database != ":memory:":
            Path(url.database).expanduser().parent.mkdir(parents=True, exist_ok=True)
        # Writers wait for each other instead of failing at once (the CLI beside a server).
        return StateUrl(url.set(drivername="sqlite+aiosqlite"), connect_args={"timeout": 30})
    if backend in ("postgresql", "postgres"):
        schema = url.query.get("schema")
        if isinstance(schema, tuple):
            schema = schema[-1]
        url = url.set(drivername="postgresql+asyncpg").difference_update_query(["schema"])
        args: dict[str, Any] = {}
        if schema:
            args["server_settings"] = {"search_path": schema}
        return StateUrl(url, schema or None, args)
    raise ValueError(f"state_url must be sqlite:/// or postgresql:// (got {backend!r})")
