"""A reader of the documents table where releases before the records database kept customers,
keys and meters (versioned rows; the newest version of an id wins). Only the import reads it."""

from __future__ import annotations

from typing import Any

import orjson

from meterflow.storage.base import Storage, quote


async def exists(storage: Storage) -> bool:
    rows = await storage.query(
        "SELECT count() AS n FROM system.tables WHERE database = currentDatabase() AND name = 'documents'"
    )
    return bool(rows) and int(rows[0]["n"]) > 0


async def latest(storage: Storage, kind: str, page: int = 1000) -> list[tuple[dict[str, Any], bool]]:
    """Every document of a kind at its newest version, in id order, with its deleted flag."""
    out: list[tuple[dict[str, Any], bool]] = []
    after = ""
    while True:
        rows = await storage.query(
            "SELECT id, argMax(body, version) AS b, argMax(deleted, version) AS d FROM documents "
            f"WHERE kind = {quote(kind)} AND id > {quote(after)} GROUP BY id ORDER BY id LIMIT {int(page)}"
        )
        out += [(orjson.loads(str(r["b"])), bool(int(r["d"]))) for r in rows]
        if len(rows) < page:
            return out
        after = str(rows[-1]["id"])
