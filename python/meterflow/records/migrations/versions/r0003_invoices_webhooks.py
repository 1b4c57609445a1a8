"""Invoices, their yearly number counters, webhooks and the webhook outbox with its delivery log.

Revision ID: 0003
Revises: 0002
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def _id(length: int = 255) -> sa.types.TypeEngine[str]:
    # Written out here, not imported: a migration must not change when tables.py does.
    return sa.String(length).with_variant(sa.String(length, collation="C"), "postgresql")


def upgrade() -> None:
    op.create_table(
        "webhooks",
        sa.Column("id", _id(32), primary_key=True),
        sa.Column("url", sa.Text, nullable=False),
        sa.Column("secret", sa.String(64), nullable=False),
        sa.Column("events", sa.JSON, nullable=False),
        sa.Column("description", sa.Text),
        sa.Column("created_at", sa.BigInteger, nullable=False),
        sa.Column("deleted_at", sa.BigInteger),
    )
    op.create_table(
        "webhook_deliveries",
        sa.Column("id", _id(40), primary_key=True),
        sa.Column("webhook_id", _id(32), sa.ForeignKey("webhooks.id"), nullable=False),
        sa.Column("event_type", sa.String(64), nullable=False),
        sa.Column("payload", sa.Text, nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("attempts", sa.Integer, nullable=False),
        sa.Column("created_at", sa.BigInteger, nullable=False),
        sa.Column("next_attempt_at", sa.BigInteger, nullable=False),
        sa.Column("claim", sa.String(32)),
        sa.Column("delivered_at", sa.BigInteger),
        sa.CheckConstraint("status IN ('pending', 'delivered', 'failed')", name="webhook_deliveries_status"),
    )
    op.create_index("webhook_deliveries_due", "webhook_deliveries", ["status", "next_attempt_at"])
    op.create_index("webhook_deliveries_webhook", "webhook_deliveries", ["webhook_id", "created_at"])
    op.create_table(
        "webhook_attempts",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer, "sqlite"), primary_key=True, autoincrement=True),
        sa.Column("delivery_id", _id(40), sa.ForeignKey("webhook_deliveries.id"), nullable=False),
        sa.Column("attempted_at", sa.BigInteger, nullable=False),
        sa.Column("status_code", sa.Integer),
        sa.Column("error", sa.Text),
        sa.Column("duration_ms", sa.Integer, nullable=False),
    )
    op.create_index("webhook_attempts_delivery", "webhook_attempts", ["delivery_id", "id"])
    op.create_table(
        "invoices",
        sa.Column("id", _id(32), primary_key=True),
        sa.Column("customer_id", _id(), nullable=False),
        sa.Column("subscription_id", _id(64), nullable=False),
        sa.Column("period_start", sa.BigInteger, nullable=False),
        sa.Column("period_end", sa.BigInteger, nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("number", sa.String(32), unique=True),
        sa.Column("currency", sa.String(3), nullable=False),
        sa.Column("total", sa.String(64), nullable=False),
        sa.Column("document", sa.JSON, nullable=False),
        sa.Column("created_at", sa.BigInteger, nullable=False),
        sa.Column("issued_at", sa.BigInteger),
        sa.Column("due_at", sa.BigInteger),
        sa.Column("paid_at", sa.BigInteger),
        sa.Column("voided_at", sa.BigInteger),
        sa.Column("version", sa.Integer, nullable=False),
        sa.CheckConstraint("status IN ('draft', 'finalized', 'paid', 'void')", name="invoices_status"),
        sa.UniqueConstraint("subscription_id", "period_start", name="invoices_subscription_period"),
    )
    op.create_index("invoices_customer", "invoices", ["customer_id", "id"])
    op.create_table(
        "invoice_numbers",
        sa.Column("year", sa.Integer, primary_key=True, autoincrement=False),
        sa.Column("last", sa.Integer, nullable=False),
    )


def downgrade() -> None:
    for table in ("invoice_numbers", "invoices", "webhook_attempts", "webhook_deliveries", "webhooks"):
        op.drop_table(table)
