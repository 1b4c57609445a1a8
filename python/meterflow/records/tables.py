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
    sa.ForeignKeyConstraint(["plan_code", "plan_version"], ["plan_versions.code", "plan_versions.plan_version"]),
    sa.CheckConstraint("end_at IS NULL OR end_at >= start_at", name="subscriptions_ends_after_start"),
)
