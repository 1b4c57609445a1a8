"""Ingest: from a decoded batch to events stored exactly once (DESIGN §3).

Owns: accepting a batch (`service`: decode through the Rust door, reserve, store
or queue), the dedup backends (`dedup/`), exactly-once's one sequence, store →
commit | release, for both modes (`commit`), the sync mode's grouping of
requests into flushes (`flusher`), and the async mode's event stream and its
worker (`stream`, `worker`).
Does not own: the Rust core and the flush id's format (`kernel`), the Redis
connections (`meterflow.redis`), storage, the archive spool (`archive`), rate
limits and keys (`auth`), or the HTTP answers (`api`).
"""
