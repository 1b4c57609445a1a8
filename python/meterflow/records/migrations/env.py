"""Alembic's environment: migrations run on the connection `records.migrate` hands in."""

from __future__ import annotations

from alembic import context

from meterflow.records.tables import metadata

connection = context.config.attributes["connection"]
context.configure(
    connection=connection,
    target_metadata=metadata,
    # SQLite changes tables by copying them; Alembic's batch mode does that.
    render_as_batch=connection.dialect.name == "sqlite",
)
with context.begin_transaction():
    context.run_migrations()
