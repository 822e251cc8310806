"""The state store: managed API keys, providers added at run time, per-key usage.

One SQL database shared by every replica (SQLite by default, PostgreSQL for several replicas),
reached through SQLAlchemy's async engine; its schema is versioned with Alembic migrations
shipped in ``migrations/`` and applied on start (``StateStore.upgrade``). See docs/keys.md.
"""

from embedplex.state.store import StateStore

__all__ = ["StateStore"]
