"""The records database on SQLite and PostgreSQL."""
