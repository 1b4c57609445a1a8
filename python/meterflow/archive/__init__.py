"""The raw-event archive (DESIGN §7): one zstd NDJSON object per flush, spooled to
disk first, then uploaded to S3 or a directory by a background task with backoff.

A flush's object reaches the spool before the flush commits, so every
acknowledged event is on disk or in the archive; the spool survives restarts
and is bounded (a full spool refuses ingestion with 503, it never drops).
`format` names and encodes objects, `stores` holds them, `spool` carries
them there, `replay` reads them back into storage.

Owns: the archive's objects, the spool and the stores. Does not own: the flush
ids and the Rust decoder it uses (`kernel`), nor storage (`storage`).
"""

from meterflow.archive.format import PREFIX, ArchiveError, key_hour_ms, object_key
from meterflow.archive.spool import Spool, SpoolFull
from meterflow.archive.stores import DirectoryStore, S3Store, Store, open_store

__all__ = [
    "PREFIX", "ArchiveError", "DirectoryStore", "S3Store", "Spool", "SpoolFull", "Store", "key_hour_ms",
    "object_key", "open_store",
]  # fmt: skip
