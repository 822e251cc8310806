"""Initial schema: api_keys, providers, usage, state_version.

Revision ID: 0001
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

_TS = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "api_keys",
        sa.Column("id", sa.String(32), primary_key=True),
        sa.Column("name", sa.String(128), nullable=False, unique=True),
        sa.Column("secret_hash", sa.Text, nullable=False),
        sa.Column("models", sa.JSON, nullable=False),
        sa.Column("rpm", sa.Integer),
        sa.Column("tpm", sa.Integer),
        sa.Column("max_concurrent", sa.Integer),
        sa.Column("priority", sa.String(16), nullable=False),
        sa.Column("weight", sa.Integer, nullable=False),
        sa.Column("created_at", _TS, nullable=False),
        sa.Column("expires_at", _TS),
        sa.Column("revoked_at", _TS),
        sa.Column("rotated_at", _TS),
    )
    op.create_table(
        "providers",
        sa.Column("name", sa.String(128), primary_key=True),
        sa.Column("config", sa.JSON, nullable=False),
        sa.Column("serve_as", sa.String(256)),
        sa.Column("updated_at", _TS, nullable=False),
    )
    op.create_table(
        "usage",
        sa.Column("key_id", sa.String(32), primary_key=True),
        sa.Column("bucket", _TS, primary_key=True),
        sa.Column("requests", sa.BigInteger, nullable=False),
        sa.Column("inputs", sa.BigInteger, nullable=False),
        sa.Column("tokens", sa.BigInteger, nullable=False),
        sa.Column("refusals", sa.BigInteger, nullable=False),
    )
    op.create_index("usage_bucket", "usage", ["bucket"])
    version = op.create_table(
        "state_version",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("version", sa.BigInteger, nullable=False),
    )
    op.bulk_insert(version, [{"id": 1, "version": 0}])


def downgrade() -> None:
    for table in ("state_version", "usage", "providers", "api_keys"):
        op.drop_table(table)
