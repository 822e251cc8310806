"""usage_flushes: the ids of recent usage flushes, so a retried flush is written once.

Revision ID: 0002
Revises: 0001
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "usage_flushes",
        sa.Column("id", sa.String(32), primary_key=True),
        sa.Column("at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_index("ix_usage_flushes_at", "usage_flushes", ["at"])


def downgrade() -> None:
    op.drop_table("usage_flushes")
