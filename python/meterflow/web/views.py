"""What both HTTP edges show alike: an invoice's document (live or frozen) and its headers, a usage answer."""

from __future__ import annotations

import asyncio
from typing import Any

from starlette.requests import Request
from starlette.responses import Response

from meterflow.billing.documents import Document, Seller, build, render_html, render_pdf
from meterflow.billing.rendered import FROZEN_STATUSES, Format, invoice_bytes
from meterflow.billing.snapshot import meter_units, seller_address, take_snapshot
from meterflow.kernel.ids import INVOICE_ID_RE
from meterflow.metering.usage import GROUP_SEPARATOR, Usage
from meterflow.runtime import Runtime
from meterflow.web.browser import DOCUMENT_CSP
from meterflow.web.errors import or_not_found
from meterflow.web.params import path_id
from meterflow.web.state import runtime_of


def invoice_id_of(request: Request) -> str:
    return path_id(request, "invoice_id", INVOICE_ID_RE, "invoice_not_found", "There is no invoice {id}.")


async def invoice_of(request: Request) -> dict[str, Any]:
    iid = invoice_id_of(request)
    invoice = await runtime_of(request).invoices.get(iid)
    return or_not_found(invoice, "invoice_not_found", f"There is no invoice {iid!r}.")


async def _live(rt: Runtime, invoice: dict[str, Any]) -> Document:
    """A draft's document, from the customer, seller and meters as they are now."""
    s, units = rt.settings, await meter_units(rt.meters, invoice)
    customer = await rt.customers.get(invoice["customer_id"])
    return build(invoice, customer, Seller(s.invoice_seller_name, tuple(seller_address(s))), units, s.invoice_locale)


async def with_snapshot(rt: Runtime, invoice: dict[str, Any]) -> dict[str, Any]:
    """The invoice with its snapshot; one finalized before snapshots were taken gets one of the live data, which
    its first rendered document then freezes."""
    if "snapshot" in invoice:
        return invoice
    return {**invoice, "snapshot": await take_snapshot(rt.customers, rt.meters, rt.settings, invoice)}


async def invoice_document(request: Request, fmt: Format) -> tuple[dict[str, Any], bytes, str | None]:
    """(invoice, document bytes, SHA-256 of the frozen bytes): a draft renders live each time (no hash); a
    finalized, paid or void invoice answers the bytes rendered once and stored (billing/rendered.py)."""
    rt = runtime_of(request)
    invoice = await invoice_of(request)
    if invoice["status"] in FROZEN_STATUSES:
        body, sha = await invoice_bytes(rt.records, await with_snapshot(rt, invoice), fmt)
        return invoice, body, sha
    doc = await _live(rt, invoice)
    # Typesetting is CPU work: off the event loop.
    return invoice, render_html(doc).encode() if fmt == "html" else await asyncio.to_thread(render_pdf, doc), None


def document_headers(invoice: dict[str, Any], ext: str) -> dict[str, str]:
    return {"Content-Disposition": f'inline; filename="{invoice["number"] or invoice["id"]}.{ext}"'}


def _matches(if_none_match: str, etag: str) -> bool:
    """Whether `If-None-Match` (a list of tags, weak or strong, or `*`) names `etag` (RFC 9110's weak comparison)."""
    tags = [t.strip().removeprefix("W/") for t in if_none_match.split(",")]
    return "*" in tags or etag in tags


def document_response(request: Request, body: bytes, media_type: str, headers: dict[str, str],
                      sha256: str | None) -> Response:  # fmt: skip
    """A document; a frozen one (with its hash) carries `ETag: "<sha256>"`, and a matching `If-None-Match`
    answers 304 without the body. An HTML one carries its CSP as a header (the bytes stay as frozen)."""
    if media_type.startswith("text/html"):
        headers = {"Content-Security-Policy": DOCUMENT_CSP, **headers}
    if sha256 is None:
        return Response(body, media_type=media_type, headers=headers)
    etag = f'"{sha256}"'
    headers = {**headers, "ETag": etag}
    if _matches(request.headers.get("if-none-match", ""), etag):
        return Response(status_code=304, headers=headers)
    return Response(body, media_type=media_type, headers=headers)


def usage_json(u: Usage) -> dict[str, Any]:
    """The JSON shape of a usage answer: values as exact numbers, breakdown keys joined by `|`."""
    r = u.request
    out: dict[str, Any] = {
        "customer_id": r.customer_id,
        "meter": r.meter.code,
        "period": {"start": r.start, "end": r.end},
        "value": u.value,
        "unit": r.meter.unit,
        "aggregation": r.meter.aggregation,
    }
    if r.filters:
        out["filters"] = {p: list(v) for p, v in r.filters}
    if u.breakdown is not None:
        out["group_by"] = list(r.group_by)
        out["breakdown"] = {GROUP_SEPARATOR.join(k): v for k, v in u.breakdown.items()}
    if u.series is not None:
        out["window"] = r.window
        out["tz"] = r.tz.key
        out["series"] = [{"start": w.start, "end": w.end, "value": w.value} for w in u.series]
    return out
