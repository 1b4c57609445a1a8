"""Ingest: decode (Rust core), dedup, group-commit flusher."""
