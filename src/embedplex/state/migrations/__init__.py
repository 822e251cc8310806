"""Alembic migrations of the state store, applied by ``StateStore.upgrade``."""
