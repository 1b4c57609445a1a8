"""The books that stay right: meter versions, time-zone history, credit notes, frozen documents, closing failures.

Revision ID: 0004
Revises: 0003
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def _id(length: int = 255) -> sa.types.TypeEngine[str]:
    # Written out here, not imported: a migration must not change when tables.py does.
    return sa.String(length).with_variant(sa.String(length, collation="C"), "postgresql")


def upgrade() -> None:
    op.create_table(
        "meter_versions",
        sa.Column("code", _id(63), primary_key=True),
        sa.Column("effective_at", sa.BigInteger, primary_key=True, autoincrement=False),
        sa.Column("definition", sa.JSON),
        sa.Column("created_at", sa.BigInteger, nullable=False),
    )
    # Every meter there is today has meant what it means now since ever.
    op.execute(
        "INSERT INTO meter_versions (code, effective_at, definition, created_at) "
        "SELECT code, 0, definition, created_at FROM meters WHERE deleted_at IS NULL"
    )
    op.create_table(
        "customer_timezones",
        sa.Column("customer_id", _id(), primary_key=True),
        sa.Column("changed_at", sa.BigInteger, primary_key=True, autoincrement=False),
        sa.Column("timezone", sa.String(64), nullable=False),
    )
    op.execute(
        "INSERT INTO customer_timezones (customer_id, changed_at, timezone) "
        "SELECT id, 0, timezone FROM customers"
    )
    # Plain ADD COLUMN (no table rebuild on SQLite, so the invoices' constraints stay as they are).
    op.add_column("subscriptions", sa.Column("settle_from", sa.BigInteger))
    op.add_column("invoices", sa.Column("kind", sa.String(8), nullable=False, server_default="period"))
    op.add_column("invoices", sa.Column("amount_credited", sa.String(64), nullable=False, server_default="0"))
    op.create_table(
        "credit_notes",
        sa.Column("id", _id(32), primary_key=True),
        sa.Column("number", sa.String(32), nullable=False, unique=True),
        sa.Column("invoice_id", _id(32), sa.ForeignKey("invoices.id"), nullable=False),
        sa.Column("customer_id", _id(), nullable=False),
        sa.Column("subscription_id", _id(64), nullable=False),
        sa.Column("reason", sa.String(24), nullable=False),
        sa.Column("currency", sa.String(3), nullable=False),
        sa.Column("total", sa.String(64), nullable=False),
        sa.Column("document", sa.JSON, nullable=False),
        sa.Column("created_at", sa.BigInteger, nullable=False),
        sa.CheckConstraint("reason IN ('retroactive_change', 'late_correction', 'manual')", name="credit_notes_reason"),
        sa.Index("credit_notes_invoice", "invoice_id", "id"),
        sa.Index("credit_notes_customer", "customer_id", "id"),
    )
    op.create_table(
        "credit_note_numbers",
        sa.Column("year", sa.Integer, primary_key=True, autoincrement=False),
        sa.Column("last", sa.Integer, nullable=False),
    )
    op.create_table(
        "rendered_documents",
        sa.Column("owner_id", _id(40), primary_key=True),
        sa.Column("format", sa.String(8), primary_key=True),
        sa.Column("sha256", sa.String(64), nullable=False),
        sa.Column("body", sa.LargeBinary, nullable=False),
        sa.Column("created_at", sa.BigInteger, nullable=False),
    )
    op.create_table(
        "closing_failures",
        sa.Column("subscription_id", _id(64), primary_key=True),
        sa.Column("period_start", sa.BigInteger),
        sa.Column("error", sa.Text, nullable=False),
        sa.Column("first_failed_at", sa.BigInteger, nullable=False),
        sa.Column("last_failed_at", sa.BigInteger, nullable=False),
        sa.Column("attempts", sa.Integer, nullable=False),
    )


def downgrade() -> None:
    for t in ("closing_failures", "rendered_documents", "credit_note_numbers", "credit_notes",
              "customer_timezones", "meter_versions"):  # fmt: skip
        op.drop_table(t)
    with op.batch_alter_table("invoices") as b:
        b.drop_column("amount_credited")
        b.drop_column("kind")
    with op.batch_alter_table("subscriptions") as b:
        b.drop_column("settle_from")
