"""/v1/invoices: list, read, and the lifecycle transitions finalize, void and mark_paid."""

from __future__ import annotations

import asyncio
import re
from typing import Any

from starlette.requests import Request
from starlette.responses import Response

from meterflow.api.errors import ApiError
from meterflow.api.openapi import PAGE, Param, operation
from meterflow.api.responses import json_response, page_params
from meterflow.billing.documents import Document, Seller, build, render_html, render_pdf
from meterflow.billing.invoices import STATUSES, Invoices, WrongStatus
from meterflow.customers import ID_RE
from meterflow.runtime import runtime_of

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


async def _document(request: Request) -> tuple[dict[str, Any], Document]:
    iid = _id(request)
    rt = runtime_of(request)
    invoice = await rt.invoices.get(iid)
    if invoice is None:
        raise ApiError(404, "invoice_not_found", f"There is no invoice {iid!r}.")
    units: dict[str, str] = {}
    for code in {ln["meter"] for ln in invoice["lines"] if ln.get("meter")}:
        meter = await rt.meters.get(code)
        units[code] = meter.unit if meter is not None else ""
    s = rt.settings
    seller = Seller(s.invoice_seller_name, tuple(x.strip() for x in s.invoice_seller_address.split("|") if x.strip()))
    customer = await rt.customers.get(invoice["customer_id"])
    return invoice, build(invoice, customer, seller, units, s.invoice_locale)


def _filename(invoice: dict[str, Any], ext: str) -> dict[str, str]:
    return {"Content-Disposition": f'inline; filename="{invoice["number"] or invoice["id"]}.{ext}"'}


@operation("The invoice as an HTML page (the same content as the PDF)", {200: "The page", 404: NOT_FOUND},
           media_type="text/html")  # fmt: skip
async def get_invoice_html(request: Request) -> Response:
    invoice, doc = await _document(request)
    return Response(render_html(doc), media_type="text/html; charset=utf-8", headers=_filename(invoice, "html"))


@operation("The invoice as a PDF, typeset with Typst", {200: "The PDF", 404: NOT_FOUND},
           media_type="application/pdf")  # fmt: skip
async def get_invoice_pdf(request: Request) -> Response:
    invoice, doc = await _document(request)
    pdf = await asyncio.to_thread(render_pdf, doc)  # typesetting is CPU work: off the event loop
    return Response(pdf, media_type="application/pdf", headers=_filename(invoice, "pdf"))


async def _transition(request: Request, action: str) -> Response:
    iid = _id(request)
    try:
        invoice = await _store(request).transition(iid, action)
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
