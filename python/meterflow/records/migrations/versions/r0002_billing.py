"""Plans, their versions and subscriptions.

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


def _id(length: int = 255) -> sa.types.TypeEngine[str]:
    # Written out here, not imported: a migration must not change when tables.py does.
    return sa.String(length).with_variant(sa.String(length, collation="C"), "postgresql")


def upgrade() -> None:
    op.create_table(
        "plans",
        sa.Column("code", _id(63), primary_key=True),
        sa.Column("plan_version", sa.Integer, nullable=False),
        sa.Column("created_at", sa.BigInteger, nullable=False),
        sa.Column("updated_at", sa.BigInteger, nullable=False),
        sa.Column("archived_at", sa.BigInteger),
        sa.Column("version", sa.Integer, nullable=False),
    )
    op.create_table(
        "plan_versions",
        sa.Column("code", _id(63), primary_key=True),
        sa.Column("plan_version", sa.Integer, primary_key=True),
        sa.Column("definition", sa.JSON, nullable=False),
        sa.Column("created_at", sa.BigInteger, nullable=False),
    )
    op.create_table(
        "subscriptions",
        sa.Column("id", _id(40), primary_key=True),
        sa.Column("customer_id", _id(), nullable=False),
        sa.Column("plan_code", _id(63), nullable=False),
        sa.Column("plan_version", sa.Integer, nullable=False),
        sa.Column("start_at", sa.BigInteger, nullable=False),
        sa.Column("end_at", sa.BigInteger),
        sa.Column("end_reason", sa.String(16)),
        sa.Column("created_at", sa.BigInteger, nullable=False),
        sa.Column("updated_at", sa.BigInteger, nullable=False),
        sa.Column("version", sa.Integer, nullable=False),
        sa.ForeignKeyConstraint(["plan_code", "plan_version"], ["plan_versions.code", "plan_versions.plan_version"]),
        sa.CheckConstraint("end_at IS NULL OR end_at >= start_at", name="subscriptions_ends_after_start"),
    )
    op.create_index("ix_subscriptions_customer_id", "subscriptions", ["customer_id"])


def downgrade() -> None:
    op.drop_index("ix_subscriptions_customer_id", "subscriptions")
    for table in ("subscriptions", "plan_versions", "plans"):
        op.drop_table(table)
