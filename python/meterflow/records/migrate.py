"""Alembic migrations of the records database, shipped inside the package and run in-process."""

from __future__ import annotations

from pathlib import Path

import sqlalchemy as sa
from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext

MIGRATIONS = Path(__file__).parent / "migrations"
# Any constant: concurrent starts of several workers take turns on this lock.
_LOCK_ID = 0x4D46_5245_4353  # "MFRECS"


def config(connection: sa.Connection) -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    cfg.attributes["connection"] = connection
    return cfg


def upgrade(connection: sa.Connection) -> str:
    """Applies every migration not yet applied; returns the revision now in force."""
    if connection.dialect.name == "postgresql":
        connection.execute(sa.text(f"SELECT pg_advisory_xact_lock({_LOCK_ID})"))
    command.upgrade(config(connection), "head")
    return current(connection)


def current(connection: sa.Connection) -> str:
    return MigrationContext.configure(connection).get_current_revision() or "none"
