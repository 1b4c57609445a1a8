"""The records database's tables (SQLAlchemy Core), one definition for SQLite and PostgreSQL.

Times are epoch milliseconds, as the API shows them. Every record carries a
`version` that each change raises by one (the ETag); deletes are soft
(`deleted_at`) so a record that comes back keeps counting up and an old ETag
never matches again. Ids sort bytewise on both engines (`COLLATE "C"` on
PostgreSQL), so cursor pagination means the same thing everywhere.
"""

from __future__ import annotations

import sqlalchemy as sa

metadata = sa.MetaData()


def record_id(length: int = 255) -> sa.types.TypeEngine[str]:
    """A text id that compares bytewise (SQLite's default; PostgreSQL's "C" collation)."""
    return sa.String(length).with_variant(sa.String(length, collation="C"), "postgresql")


customers = sa.Table(
    "customers",
    metadata,
    sa.Column("id", record_id(), primary_key=True),
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

# No foreign key from customer_id to customers: an ingest key may be bound to a
# customer before the CRM sync creates it, as events for unknown customers are accepted.
api_keys = sa.Table(
    "api_keys",
    metadata,
    sa.Column("id", record_id(12), primary_key=True),
    sa.Column("name", sa.Text, nullable=False),
    sa.Column("scope", sa.String(16), nullable=False),
    sa.Column("customer_id", record_id()),
    sa.Column("rate_limits", sa.JSON, nullable=False),
    sa.Column("hash", sa.String(64), nullable=False, unique=True),
    sa.Column("created_at", sa.BigInteger, nullable=False),
    sa.Column("last_used_at", sa.BigInteger),
    sa.Column("revoked_at", sa.BigInteger),
    sa.Column("version", sa.Integer, nullable=False),
    sa.CheckConstraint("scope IN ('ingest', 'read', 'admin')", name="api_keys_scope"),
    sa.CheckConstraint("customer_id IS NULL OR scope = 'ingest'", name="api_keys_customer_scope"),
)

# Meters made through the API (config meters live in the config file).
meters = sa.Table(
    "meters",
    metadata,
    sa.Column("code", record_id(63), primary_key=True),
    sa.Column("definition", sa.JSON, nullable=False),
    sa.Column("created_at", sa.BigInteger, nullable=False),
    sa.Column("updated_at", sa.BigInteger, nullable=False),
    sa.Column("deleted_at", sa.BigInteger),
    sa.Column("version", sa.Integer, nullable=False),
)

# One row per finished import of an older release's records (see legacy.py).
legacy_imports = sa.Table(
    "legacy_imports",
    metadata,
    sa.Column("source", sa.String(64), primary_key=True),
    sa.Column("imported_at", sa.BigInteger, nullable=False),
    sa.Column("customers", sa.Integer, nullable=False),
    sa.Column("api_keys", sa.Integer, nullable=False),
    sa.Column("meters", sa.Integer, nullable=False),
)

# Receivers of invoice events (Standard Webhooks); the secret signs every delivery, so it is kept as is.
webhooks = sa.Table(
    "webhooks",
    metadata,
    sa.Column("id", record_id(32), primary_key=True),
    sa.Column("url", sa.Text, nullable=False),
    sa.Column("secret", sa.String(64), nullable=False),
    sa.Column("events", sa.JSON, nullable=False),
    sa.Column("description", sa.Text),
    sa.Column("created_at", sa.BigInteger, nullable=False),
    sa.Column("deleted_at", sa.BigInteger),
)

# The outbox: one row per (event, webhook), written in the transaction that makes the event.
# `next_attempt_at` is also the claim: a sender moves it one lease ahead with a compare-and-set.
webhook_deliveries = sa.Table(
    "webhook_deliveries",
    metadata,
    sa.Column("id", record_id(40), primary_key=True),
    sa.Column("webhook_id", record_id(32), sa.ForeignKey("webhooks.id"), nullable=False),
    sa.Column("event_type", sa.String(64), nullable=False),
    sa.Column("payload", sa.Text, nullable=False),
    sa.Column("status", sa.String(16), nullable=False),
    sa.Column("attempts", sa.Integer, nullable=False),
    sa.Column("created_at", sa.BigInteger, nullable=False),
    sa.Column("next_attempt_at", sa.BigInteger, nullable=False),
    sa.Column("claim", sa.String(32)),
    sa.Column("delivered_at", sa.BigInteger),
    sa.CheckConstraint("status IN ('pending', 'delivered', 'failed')", name="webhook_deliveries_status"),
    sa.Index("webhook_deliveries_due", "status", "next_attempt_at"),
    sa.Index("webhook_deliveries_webhook", "webhook_id", "created_at"),
)

# The delivery log: every attempt, its answer or its error.
webhook_attempts = sa.Table(
    "webhook_attempts",
    metadata,
    sa.Column("id", sa.BigInteger().with_variant(sa.Integer, "sqlite"), primary_key=True, autoincrement=True),
    sa.Column("delivery_id", record_id(40), sa.ForeignKey("webhook_deliveries.id"), nullable=False),
    sa.Column("attempted_at", sa.BigInteger, nullable=False),
    sa.Column("status_code", sa.Integer),
    sa.Column("error", sa.Text),
    sa.Column("duration_ms", sa.Integer, nullable=False),
    sa.Index("webhook_attempts_delivery", "delivery_id", "id"),
)

# Invoices: `document` holds the priced lines; frozen (never written again) once finalized.
invoices = sa.Table(
    "invoices",
    metadata,
    sa.Column("id", record_id(32), primary_key=True),
    sa.Column("customer_id", record_id(), nullable=False),
    sa.Column("subscription_id", record_id(64), nullable=False),
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
    # `period`: one billing period of the subscription; `late`: late lines only, of ended subscriptions.
    sa.Column("kind", sa.String(8), nullable=False, server_default="period"),
    # The sum of the invoice's credit notes, raised in the transaction that makes each one.
    sa.Column("amount_credited", sa.String(64), nullable=False, server_default="0"),
    sa.CheckConstraint("status IN ('draft', 'finalized', 'paid', 'void')", name="invoices_status"),
    sa.UniqueConstraint("subscription_id", "period_start", name="invoices_subscription_period"),
    sa.Index("invoices_customer", "customer_id", "id"),
)

# The last invoice number given per calendar year, raised in the transaction that finalizes.
invoice_numbers = sa.Table(
    "invoice_numbers",
    metadata,
    sa.Column("year", sa.Integer, primary_key=True, autoincrement=False),
    sa.Column("last", sa.Integer, nullable=False),
)

# Plans made through the API (config plans live in the config file). `version` is the
# record's (the ETag); `plan_version` the definition in force for new subscriptions.
plans = sa.Table(
    "plans",
    metadata,
    sa.Column("code", record_id(63), primary_key=True),
    sa.Column("plan_version", sa.Integer, nullable=False),
    sa.Column("created_at", sa.BigInteger, nullable=False),
    sa.Column("updated_at", sa.BigInteger, nullable=False),
    sa.Column("archived_at", sa.BigInteger),
    sa.Column("version", sa.Integer, nullable=False),
)

# Every definition a plan has had that a subscription may bill with; config plans
# are recorded here too (once per distinct definition), so subscriptions name them alike.
plan_versions = sa.Table(
    "plan_versions",
    metadata,
    sa.Column("code", record_id(63), primary_key=True),
    sa.Column("plan_version", sa.Integer, primary_key=True),
    sa.Column("definition", sa.JSON, nullable=False),
    sa.Column("created_at", sa.BigInteger, nullable=False),
)

# A customer on one version of a plan over [start_at, end_at) (end_at NULL: open).
subscriptions = sa.Table(
    "subscriptions",
    metadata,
    sa.Column("id", record_id(40), primary_key=True),
    sa.Column("customer_id", record_id(), nullable=False, index=True),
    sa.Column("plan_code", record_id(63), nullable=False),
    sa.Column("plan_version", sa.Integer, nullable=False),
    sa.Column("start_at", sa.BigInteger, nullable=False),
    sa.Column("end_at", sa.BigInteger),
    sa.Column("end_reason", sa.String(16)),
    sa.Column("created_at", sa.BigInteger, nullable=False),
    sa.Column("updated_at", sa.BigInteger, nullable=False),
    sa.Column("version", sa.Integer, nullable=False),
    # The earliest instant whose finalized periods a change made after the fact touches (a cancel,
    # a plan change, a meter version dated in the past); closing settles them and clears it.
    sa.Column("settle_from", sa.BigInteger),
    sa.ForeignKeyConstraint(["plan_code", "plan_version"], ["plan_versions.code", "plan_versions.plan_version"]),
    sa.CheckConstraint("end_at IS NULL OR end_at >= start_at", name="subscriptions_ends_after_start"),
)

# Every definition a meter has had, each in force from `effective_at` until the next one (NULL
# definition: deleted from then on). A period is priced with the version in force at its start.
meter_versions = sa.Table(
    "meter_versions",
    metadata,
    sa.Column("code", record_id(63), primary_key=True),
    sa.Column("effective_at", sa.BigInteger, primary_key=True, autoincrement=False),
    sa.Column("definition", sa.JSON),
    sa.Column("created_at", sa.BigInteger, nullable=False),
)

# Every time zone a customer has had, from the instant it was set; a period that has begun
# keeps the bounds it opened with, so a change applies from the next period boundary.
customer_timezones = sa.Table(
    "customer_timezones",
    metadata,
    sa.Column("customer_id", record_id(), primary_key=True),
    sa.Column("changed_at", sa.BigInteger, primary_key=True, autoincrement=False),
    sa.Column("timezone", sa.String(64), nullable=False),
)

# Credit notes: what is no longer owed on a finalized invoice; `document` holds lines that name
# the invoice lines they correct. Never written again once made.
credit_notes = sa.Table(
    "credit_notes",
    metadata,
    sa.Column("id", record_id(32), primary_key=True),
    sa.Column("number", sa.String(32), nullable=False, unique=True),
    sa.Column("invoice_id", record_id(32), sa.ForeignKey("invoices.id"), nullable=False),
    sa.Column("customer_id", record_id(), nullable=False),
    sa.Column("subscription_id", record_id(64), nullable=False),
    sa.Column("reason", sa.String(24), nullable=False),
    sa.Column("currency", sa.String(3), nullable=False),
    sa.Column("total", sa.String(64), nullable=False),
    sa.Column("document", sa.JSON, nullable=False),
    sa.Column("created_at", sa.BigInteger, nullable=False),
    sa.CheckConstraint("reason IN ('retroactive_change', 'late_correction', 'manual')", name="credit_notes_reason"),
    sa.Index("credit_notes_invoice", "invoice_id", "id"),
    sa.Index("credit_notes_customer", "customer_id", "id"),
)

# The last credit-note number given per calendar year (a sequence of its own, gapless like invoices').
credit_note_numbers = sa.Table(
    "credit_note_numbers",
    metadata,
    sa.Column("year", sa.Integer, primary_key=True, autoincrement=False),
    sa.Column("last", sa.Integer, nullable=False),
)

# The HTML and PDF of a finalized invoice or a credit note, rendered once from its frozen
# snapshot; every later GET serves these bytes, with the SHA-256 as ETag.
rendered_documents = sa.Table(
    "rendered_documents",
    metadata,
    sa.Column("owner_id", record_id(40), primary_key=True),
    sa.Column("format", sa.String(8), primary_key=True),
    sa.Column("sha256", sa.String(64), nullable=False),
    sa.Column("body", sa.LargeBinary, nullable=False),
    sa.Column("created_at", sa.BigInteger, nullable=False),
)

# A subscription whose last closing attempt failed (a meter gone, a plan that no longer
# parses): listed by the API and the dashboard, counted in the metrics, retried every pass.
closing_failures = sa.Table(
    "closing_failures",
    metadata,
    sa.Column("subscription_id", record_id(64), primary_key=True),
    sa.Column("period_start", sa.BigInteger),
    sa.Column("error", sa.Text, nullable=False),
    sa.Column("first_failed_at", sa.BigInteger, nullable=False),
    sa.Column("last_failed_at", sa.BigInteger, nullable=False),
    sa.Column("attempts", sa.Integer, nullable=False),
)

# Dashboard sign-ins (dashboard/sessions.py): the cookie holds a random token, this table its hash.
# Sign-out deletes its row; a row counts until it expires, or its key is revoked.
dashboard_sessions = sa.Table(
    "dashboard_sessions",
    metadata,
    sa.Column("id", sa.String(64), primary_key=True),
    sa.Column("key_id", sa.String(12), nullable=False),
    sa.Column("created_at", sa.BigInteger, nullable=False),
    sa.Column("expires_at", sa.BigInteger, nullable=False),
    sa.Index("dashboard_sessions_key", "key_id"),
    sa.Index("dashboard_sessions_expires", "expires_at"),
)
