"""Customers, API keys, API-made meters and the legacy import marker.

Revision ID: 0001
Revises:
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def _id(length: int = 255) -> sa.types.TypeEngine[str]:
    # Written out here, not imported: a migration must not change when tables.py does.
    return sa.String(length).with_variant(sa.String(length, collation="C"), "postgresql")


def upgrade() -> None:
    op.create_table(
        "customers",
        sa.Column("id", _id(), primary_key=True),
        sa.Column("name", sa.Text),
        sa.Column("email", sa.String(320)),
        sa.Column("currency", sa.String(3)),
        sa.Column("timezone", sa.String(64), nullable=False),
        sa.Column("metadata", sa.JSON, nullable=False),
        sa.Column("created_at", sa.BigInteger, nullable=False),
        sa.Column("updated_at", sa.BigInteger, nullable=False),
        sa.Column("deleted_at", sa.BigInteger),
        sa.Column("version", sa.Integer, nullable=False),
    )
    op.create_table(
        "api_keys",
        sa.Column("id", _id(12), primary_key=True),
        sa.Column("name", sa.Text, nullable=False),
        sa.Column("scope", sa.String(16), nullable=False),
        sa.Column("customer_id", _id()),
        sa.Column("rate_limits", sa.JSON, nullable=False),
        sa.Column("hash", sa.String(64), nullable=False, unique=True),
        sa.Column("created_at", sa.BigInteger, nullable=False),
        sa.Column("last_used_at", sa.BigInteger),
        sa.Column("revoked_at", sa.BigInteger),
        sa.Column("version", sa.Integer, nullable=False),
        sa.CheckConstraint("scope IN ('ingest', 'read', 'admin')", name="api_keys_scope"),
        sa.CheckConstraint("customer_id IS NULL OR scope = 'ingest'", name="api_keys_customer_scope"),
    )
    op.create_table(
        "meters",
        sa.Column("code", _id(63), primary_key=True),
        sa.Column("definition", sa.JSON, nullable=False),
        sa.Column("created_at", sa.BigInteger, nullable=False),
        sa.Column("updated_at", sa.BigInteger, nullable=False),
        sa.Column("deleted_at", sa.BigInteger),
        sa.Column("version", sa.Integer, nullable=False),
    )
    op.create_table(
        "legacy_imports",
        sa.Column("source", sa.String(64), primary_key=True),
        sa.Column("imported_at", sa.BigInteger, nullable=False),
        sa.Column("customers", sa.Integer, nullable=False),
        sa.Column("api_keys", sa.Integer, nullable=False),
        sa.Column("meters", sa.Integer, nullable=False),
    )


def downgrade() -> None:
    for table in ("legacy_imports", "meters", "api_keys", "customers"):
        op.drop_table(table)
