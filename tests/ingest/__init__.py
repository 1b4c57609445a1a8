"""Ingestion: the Rust core, sync and async mode, flushing, stage metrics, failures and fault drills."""
