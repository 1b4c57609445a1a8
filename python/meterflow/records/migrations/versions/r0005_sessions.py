"""Dashboard sessions kept server-side, so sign-out, key revocation and expiry end them on every worker.

Revision ID: 0005
Revises: 0004
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "dashboard_sessions",
        # The SHA-256 of the cookie's random token: a copy of the table signs nobody in.
        sa.Column("id", sa.String(64), primary_key=True),
        sa.Column("key_id", sa.String(12), nullable=False),
        sa.Column("created_at", sa.BigInteger, nullable=False),
        sa.Column("expires_at", sa.BigInteger, nullable=False),
        sa.Index("dashboard_sessions_key", "key_id"),
        sa.Index("dashboard_sessions_expires", "expires_at"),
    )


def downgrade() -> None:
    op.drop_table("dashboard_sessions")
