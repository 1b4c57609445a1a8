"""Frozen documents: the HTML and PDF of a finalized invoice or a credit note, rendered once and kept.

The first read renders the document from its frozen record (the invoice's
snapshot) and stores the bytes with their SHA-256 in `rendered_documents`;
every later read serves those bytes, so a document once shown never changes,
whatever the renderer, the fonts or the live records do afterwards. Readers
that race on the first render each may typeset, but the primary key (owner,
format) lets one row in, and every one of them answers with that row.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Callable, Mapping
from typing import Any, Literal

import sqlalchemy as sa
from sqlalchemy.exc import IntegrityError

from meterflow.billing.documents import Document, build_credit_note, build_frozen, render_html, render_pdf
from meterflow.kernel.clock import now_ms
from meterflow.records import Records
from meterflow.records.tables import rendered_documents

Format = Literal["html", "pdf"]
FROZEN_STATUSES = ("finalized", "paid", "void")


async def _stored(records: Records, owner_id: str, fmt: str) -> tuple[bytes, str] | None:
    t = rendered_documents.c
    q = sa.select(t.body, t.sha256).where(t.owner_id == owner_id, t.format == fmt)
    async with records.connect() as conn:
        row = (await conn.execute(q)).first()
    return (bytes(row[0]), str(row[1])) if row is not None else None


async def frozen(records: Records, owner_id: str, fmt: str, render: Callable[[], bytes]) -> tuple[bytes, str]:
    """(bytes, SHA-256 hex) of `owner_id`'s document in `fmt`: the stored ones, or `render()` run once (in a
    thread: typesetting is CPU work) and stored; after a concurrent first render, the row that got in."""
    stored = await _stored(records, owner_id, fmt)
    if stored is not None:
        return stored
    body = await asyncio.to_thread(render)
    sha = hashlib.sha256(body).hexdigest()
    row = {"owner_id": owner_id, "format": fmt, "sha256": sha, "body": body, "created_at": now_ms()}
    try:
        async with records.begin() as conn:
            await conn.execute(sa.insert(rendered_documents).values(row))
    except IntegrityError:
        stored = await _stored(records, owner_id, fmt)
        if stored is None:
            raise
        return stored
    return body, sha


def _renderer(doc: Callable[[], Document], fmt: Format) -> Callable[[], bytes]:
    if fmt == "html":
        return lambda: render_html(doc()).encode()
    return lambda: render_pdf(doc())


async def invoice_bytes(records: Records, invoice: Mapping[str, Any], fmt: Format) -> tuple[bytes, str]:
    """The frozen document of a finalized, paid or void invoice that holds its `snapshot`."""
    if invoice["status"] not in FROZEN_STATUSES:
        raise ValueError(f"invoice {invoice['id']} is a {invoice['status']}: its document is not frozen")
    if "snapshot" not in invoice:
        raise ValueError(f"invoice {invoice['id']} has no snapshot to render its frozen document from")
    return await frozen(records, str(invoice["id"]), fmt, _renderer(lambda: build_frozen(invoice), fmt))


async def credit_note_bytes(
    records: Records, note: Mapping[str, Any], invoice: Mapping[str, Any], fmt: Format
) -> tuple[bytes, str]:
    """The frozen document of a credit note on `invoice` (which holds its `snapshot`)."""
    if "snapshot" not in note and "snapshot" not in invoice:
        raise ValueError(f"credit note {note['id']}: its invoice {invoice['id']} has no snapshot")
    return await frozen(records, str(note["id"]), fmt, _renderer(lambda: build_credit_note(note, invoice), fmt))
