"""/v1/invoices: list, read, and the lifecycle transitions finalize, void and mark_paid."""

from __future__ import annotations

import asyncio
import re
from typing import Any

from starlette.requests import Request
from starlette.responses import Response

from meterflow.api.errors import ApiError
from meterflow.api.openapi import PAGE, Param, operation
from meterflow.api.responses import json_body, json_response, page_params
from meterflow.billing.closing import Closer
from meterflow.billing.credit_notes import CreditAmountInvalid, CreditExceedsInvoice
from meterflow.billing.documents import Document, Seller, build, render_html, render_pdf
from meterflow.billing.invoices import STATUSES, Invoices, WrongStatus
from meterflow.billing.money import MoneyError, parse_decimal
from meterflow.billing.rendered import FROZEN_STATUSES, Format, invoice_bytes
from meterflow.billing.snapshot import meter_units, seller_address, take_snapshot
from meterflow.customers import ID_RE
from meterflow.runtime import Runtime, runtime_of

INVOICE_ID_RE = re.compile(r"inv_[0-9a-f]{24}")
NOT_FOUND = "There is no such invoice."


def _store(request: Request) -> Invoices:
    return runtime_of(request).invoices


def _id(request: Request) -> str:
    iid = str(request.path_params["invoice_id"])
    if not INVOICE_ID_RE.fullmatch(iid):
        raise ApiError(404, "invoice_not_found", f"There is no invoice {iid[:100]!r}.")
    return iid


@operation("List invoices, in id order", {200: "A page of invoices", 400: "A parameter is invalid."},
           result="Page", params=(*PAGE, Param("customer_id", "Only this customer's invoices."),
                                  Param("status", f"Only this status: {', '.join(STATUSES)}.")))  # fmt: skip
async def list_invoices(request: Request) -> Response:
    limit, cursor = page_params(request)
    q = request.query_params
    customer_id, status = q.get("customer_id", ""), q.get("status", "")
    if customer_id and not ID_RE.fullmatch(customer_id):
        raise ApiError(400, "invalid_parameter", "`customer_id` must be 1 to 255 of A-Z, a-z, 0-9, '_' or '-'.")
    if status and status not in STATUSES:
        raise ApiError(400, "invalid_parameter", f"`status` must be one of {', '.join(STATUSES)}, got {status[:40]!r}.")
    rows = await _store(request).list(cursor, limit + 1, customer_id, status)
    more = len(rows) > limit
    rows = rows[:limit]
    return json_response({"data": rows, "next_cursor": rows[-1]["id"] if more and rows else None})


@operation("Get an invoice", {200: "The invoice", 404: NOT_FOUND}, result="Invoice")
async def get_invoice(request: Request) -> Response:
    iid = _id(request)
    invoice = await _store(request).get(iid)
    if invoice is None:
        raise ApiError(404, "invoice_not_found", f"There is no invoice {iid!r}.")
    return json_response(invoice)


async def _invoice(request: Request) -> dict[str, Any]:
    iid = _id(request)
    invoice = await runtime_of(request).invoices.get(iid)
    if invoice is None:
        raise ApiError(404, "invoice_not_found", f"There is no invoice {iid!r}.")
    return invoice


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
    invoice = await _invoice(request)
    if invoice["status"] in FROZEN_STATUSES:
        body, sha = await invoice_bytes(rt.records, await with_snapshot(rt, invoice), fmt)
        return invoice, body, sha
    doc = await _live(rt, invoice)
    # Typesetting is CPU work: off the event loop.
    return invoice, render_html(doc).encode() if fmt == "html" else await asyncio.to_thread(render_pdf, doc), None


def _filename(invoice: dict[str, Any], ext: str) -> dict[str, str]:
    return {"Content-Disposition": f'inline; filename="{invoice["number"] or invoice["id"]}.{ext}"'}


def _matches(if_none_match: str, etag: str) -> bool:
    """Whether `If-None-Match` (a list of tags, weak or strong, or `*`) names `etag` (RFC 9110's weak comparison)."""
    tags = [t.strip().removeprefix("W/") for t in if_none_match.split(",")]
    return "*" in tags or etag in tags


def document_response(request: Request, body: bytes, media_type: str, headers: dict[str, str],
                      sha256: str | None) -> Response:  # fmt: skip
    """A document; a frozen one (with its hash) carries `ETag: "<sha256>"`, and a matching `If-None-Match`
    answers 304 without the body."""
    if sha256 is None:
        return Response(body, media_type=media_type, headers=headers)
    etag = f'"{sha256}"'
    headers = {**headers, "ETag": etag}
    if _matches(request.headers.get("if-none-match", ""), etag):
        return Response(status_code=304, headers=headers)
    return Response(body, media_type=media_type, headers=headers)


DOCUMENT_ANSWERS = {404: NOT_FOUND, 304: "`If-None-Match` names the frozen document's ETag (its SHA-256); no body."}


@operation("The invoice as an HTML page (the same content as the PDF); once finalized, the same bytes every time",
           {200: "The page (with `ETag` once finalized)", **DOCUMENT_ANSWERS}, media_type="text/html")  # fmt: skip
async def get_invoice_html(request: Request) -> Response:
    invoice, body, sha = await invoice_document(request, "html")
    return document_response(request, body, "text/html; charset=utf-8", _filename(invoice, "html"), sha)


@operation("The invoice as a PDF, typeset with Typst; once finalized, the same bytes every time",
           {200: "The PDF (with `ETag` once finalized)", **DOCUMENT_ANSWERS}, media_type="application/pdf")  # fmt: skip
async def get_invoice_pdf(request: Request) -> Response:
    invoice, body, sha = await invoice_document(request, "pdf")
    return document_response(request, body, "application/pdf", _filename(invoice, "pdf"), sha)


async def _transition(request: Request, action: str) -> Response:
    iid = _id(request)
    try:
        invoice = await Closer(runtime_of(request)).transition(iid, action)
    except WrongStatus as e:
        message = f"The invoice is {e.current}; {action} is not possible from it."
        raise ApiError(409, "invalid_status", message) from None
    if invoice is None:
        raise ApiError(404, "invoice_not_found", f"There is no invoice {iid!r}.")
    return json_response(invoice)


@operation("Finalize a draft: freeze its lines and give it the year's next number",
           {200: "Finalized", 404: NOT_FOUND, 409: "The invoice is not a draft."}, result="Invoice")  # fmt: skip
async def finalize_invoice(request: Request) -> Response:
    return await _transition(request, "finalize")


@operation("Void a finalized invoice (it keeps its number)",
           {200: "Voided", 404: NOT_FOUND, 409: "The invoice is not finalized."}, result="Invoice")  # fmt: skip
async def void_invoice(request: Request) -> Response:
    return await _transition(request, "void")


@operation("Mark a finalized invoice paid",
           {200: "Paid", 404: NOT_FOUND, 409: "The invoice is not finalized."}, result="Invoice")  # fmt: skip
async def mark_invoice_paid(request: Request) -> Response:
    return await _transition(request, "mark_paid")


@operation("Credit part or all of a finalized or paid invoice (a manual credit note)", {
    201: "The credit note", 400: "The body is invalid.", 404: NOT_FOUND,
    409: "The invoice is not finalized or paid, or `amount` is more than is left to credit."},
    body="CreditNoteRequest", result="CreditNote")  # fmt: skip
async def create_credit_note(request: Request) -> Response:
    iid = _id(request)
    doc = await json_body(request)
    if not isinstance(doc, dict) or set(doc) - {"amount", "memo"}:
        extra = sorted(set(doc) - {"amount", "memo"})[0] if isinstance(doc, dict) else None
        raise ApiError(400, "invalid_credit_note", f"`{extra}` is not a field here; the fields are amount and memo."
                       if extra else "The body must be a JSON object.")  # fmt: skip
    memo = doc.get("memo") or ""
    if not isinstance(memo, str) or len(memo) > 1000:
        raise ApiError(400, "invalid_credit_note", "`memo` must be a string of at most 1000 characters.")
    amount = None
    if doc.get("amount") is not None:
        try:
            amount = parse_decimal(doc["amount"], "amount", max_places=4, max_int_digits=15)
        except MoneyError as e:
            raise ApiError(400, "invalid_credit_note", e.message) from None
    try:
        note = await runtime_of(request).credit_notes.create_manual(iid, amount, memo)
    except WrongStatus as e:
        raise ApiError(409, "invalid_status", f"The invoice is {e.current}; only a finalized or paid invoice "
                       "can be credited.") from None  # fmt: skip
    except CreditExceedsInvoice as e:
        raise ApiError(409, "credit_exceeds_invoice", str(e)) from None
    except CreditAmountInvalid as e:
        raise ApiError(400, "invalid_credit_note", str(e)) from None
    if note is None:
        raise ApiError(404, "invoice_not_found", f"There is no invoice {iid!r}.")
    return json_response(note, 201)
