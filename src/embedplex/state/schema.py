"""The store's tables, as SQLAlchemy Core objects the queries use.

The migrations in ``migrations/versions`` create them; a change here needs a new migration.
``state_version`` holds one counter that every change to keys or providers increments in the
same transaction: replicas poll it (one tiny read) to learn that something changed.
``usage_flushes`` holds the id of each usage flush written lately, claimed in the flush's own
transaction, so a flush retried after an unknown outcome is not counted twice (``usage.py``).
"""

from __future__ import annotations

from sqlalchemy import (
    JSON,
    BigInteger,
    Column,
    DateTime,
    Integer,
    MetaData,
    String,
    Table,
    Text,
)

metadata = MetaData()

api_keys = Table(
    "api_keys",
    metadata,
    Column("id", String(32), primary_key=True),  # server-issued, also in the key itself
    Column("name", String(128), nullable=False, unique=True),
    Column("secret_hash", Text, nullable=False),  # argon2id; the secret is never stored
    Column("models", JSON, nullable=False),  # list of served-name patterns; [] = all
    Column("rpm", Integer),
    Column("tpm", Integer),
    Column("max_concurrent", Integer),
    Column("priority", String(16), nullable=False),
    Column("weight", Integer, nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("expires_at", DateTime(timezone=True)),
    Column("revoked_at", DateTime(timezone=True)),
    Column("rotated_at", DateTime(timezone=True)),
)

providers = Table(
    "providers",
    metadata,
    Column("name", String(128), primary_key=True),
    # ProviderConfig as JSON: key env var names, not keys (an endpoint's query as written)
    Column("config", JSON, nullable=False),
    Column("serve_as", String(256)),
    Column("updated_at", DateTime(timezone=True), nullable=False),
)

usage = Table(
    "usage",
    metadata,
    Column("key_id", String(32), primary_key=True),
    Column("bucket", DateTime(timezone=True), primary_key=True),  # the minute, UTC
    Column("requests", BigInteger, nullable=False),
    Column("inputs", BigInteger, nullable=False),
    Column("tokens", BigInteger, nullable=False),
    Column("refusals", BigInteger, nullable=False),
)

usage_flushes = Table(
    "usage_flushes",
    metadata,
    Column("id", String(32), primary_key=True),  # the flush's uuid4, hex
    Column("at", DateTime(timezone=True), nullable=False, index=True),  # claims age out by it
)

state_version = Table(
    "state_version",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("version", BigInteger, nullable=False),
)
