"""Small versioned documents (meters, customers, keys) in the system of record.

Each change is a new row; the newest version of an id wins (ReplacingMergeTree
on `version`), and reads take argMax so they are right before merges too.
"""

from __future__ import annotations

import time
from typing import Any

import orjson

from meterflow.storage.base import Storage, quote


class Documents:
    def __init__(self, storage: Storage, kind: str) -> None:
        self._storage = storage
        self._kind = kind

    async def put(self, doc_id: str, body: dict[str, Any], deleted: bool = False) -> None:
        version = time.time_ns()
        text = orjson.dumps(body).decode()
        await self._storage.execute(
            "INSERT INTO documents (kind, id, version, deleted, body) VALUES "
            f"({quote(self._kind)}, {quote(doc_id)}, {version}, {int(deleted)}, {quote(text)})"
        )

    async def delete(self, doc_id: str, body: dict[str, Any] | None = None) -> None:
        await self.put(doc_id, body or {}, deleted=True)

    async def get(self, doc_id: str, include_deleted: bool = False) -> dict[str, Any] | None:
        rows = await self._latest(f"AND id = {quote(doc_id)}", include_deleted, 1)
        return rows[0] if rows else None

    async def get_many(self, ids: list[str]) -> dict[str, dict[str, Any]]:
        if not ids:
            return {}
        rows = await self._latest(f"AND id IN ({', '.join(quote(i) for i in ids)})", False, len(ids))
        return {str(r["id"]): r for r in rows}

    async def page(
        self, after: str = "", limit: int = 100, include_deleted: bool = False, match: dict[str, str] | None = None
    ) -> list[dict[str, Any]]:
        """In id order after the cursor `after`; `match` keeps documents whose
        string field contains the text (case-insensitive)."""
        conds = [] if include_deleted else ["d = 0"]
        for name, text in (match or {}).items():
            conds.append(f"positionCaseInsensitiveUTF8(visitParamExtractString(b, {quote(name)}), {quote(text)}) > 0")
        where = f"AND id > {quote(after)}" if after else ""
        return await self._latest(where, include_deleted, limit, conds)

    async def _latest(
        self, where: str, include_deleted: bool, limit: int, conds: list[str] | None = None
    ) -> list[dict[str, Any]]:
        if conds is None:
            conds = [] if include_deleted else ["d = 0"]
        having = f"HAVING {' AND '.join(conds)}" if conds else ""
        rows = await self._storage.query(
            "SELECT id, argMax(body, version) AS b, argMax(deleted, version) AS d FROM documents "
            f"WHERE kind = {quote(self._kind)} {where} GROUP BY id {having} ORDER BY id LIMIT {int(limit)}"
        )
        out = []
        for r in rows:
            body = orjson.loads(str(r["b"]))
            if include_deleted:
                body["deleted"] = bool(r["d"])
            out.append(body)
        return out
