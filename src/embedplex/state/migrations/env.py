"""Alembic's environment: always run from ``StateStore.upgrade`` on a connection it opened."""

from __future__ import annotations

from alembic import context

from embedplex.state.schema import metadata

connection = context.config.attributes["connection"]
context.configure(connection=connection, target_metadata=metadata)
with context.begin_transaction():
    context.run_migrations()
