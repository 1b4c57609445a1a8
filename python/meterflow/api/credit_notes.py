"""/v1/credit_notes: list, read, and each note's frozen HTML and PDF documents."""

from __future__ import annotations

from typing import Any

from starlette.requests import Request
from starlette.responses import Response

from meterflow.api.invoices import DOCUMENT_ANSWERS
from meterflow.api.openapi import PAGE, Param, operation
from meterflow.billing.rendered import Format, credit_note_bytes
from meterflow.kernel.ids import CREDIT_NOTE_ID_RE, INVOICE_ID_RE, INVOICE_ID_RULE
from meterflow.web.errors import or_not_found
from meterflow.web.pagination import page_params, page_response
from meterflow.web.params import id_filter
from meterflow.web.responses import json_response
from meterflow.web.state import runtime_of
from meterflow.web.views import document_response, with_snapshot

NOT_FOUND = "There is no such credit note."


async def _note(request: Request) -> dict[str, Any]:
    nid = str(request.path_params["credit_note_id"])
    note = await runtime_of(request).credit_notes.get(nid) if CREDIT_NOTE_ID_RE.fullmatch(nid) else None
    note = or_not_found(note, "credit_note_not_found", f"There is no credit note {nid[:100]!r}.")
    return note


@operation("List credit notes, in id order", {200: "A page of credit notes", 400: "A parameter is invalid."},
           result="Page", params=(*PAGE, Param("invoice_id", "Only the credit notes of this invoice."),
                                  Param("customer_id", "Only this customer's credit notes.")))  # fmt: skip
async def list_credit_notes(request: Request) -> Response:
    limit, cursor = page_params(request)
    invoice_id = id_filter(request, "invoice_id", INVOICE_ID_RE, f"an invoice id: {INVOICE_ID_RULE}")
    customer_id = id_filter(request, "customer_id")
    rows = await runtime_of(request).credit_notes.list(cursor, limit + 1, invoice_id=invoice_id,
                                                       customer_id=customer_id)  # fmt: skip
    return page_response(rows, limit)


@operation("Get a credit note", {200: "The credit note", 404: NOT_FOUND}, result="CreditNote")
async def get_credit_note(request: Request) -> Response:
    return json_response(await _note(request))


async def _document(request: Request, fmt: Format) -> Response:
    rt = runtime_of(request)
    note = await _note(request)
    invoice = await rt.invoices.get(note["invoice_id"])
    if invoice is None:  # a foreign key keeps the invoice; this would be a broken database
        raise LookupError(f"credit note {note['id']}: there is no invoice {note['invoice_id']!r}")
    body, sha = await credit_note_bytes(rt.records, note, await with_snapshot(rt, invoice), fmt)
    media_type = "text/html; charset=utf-8" if fmt == "html" else "application/pdf"
    headers = {"Content-Disposition": f'inline; filename="{note["number"]}.{fmt}"'}
    return document_response(request, body, media_type, headers, sha)


@operation("The credit note as an HTML page (the same content as the PDF), the same bytes every time",
           {200: "The page, with `ETag`", **DOCUMENT_ANSWERS, 404: NOT_FOUND}, media_type="text/html")  # fmt: skip
async def get_credit_note_html(request: Request) -> Response:
    return await _document(request, "html")


@operation("The credit note as a PDF, typeset with Typst, the same bytes every time",
           {200: "The PDF, with `ETag`", **DOCUMENT_ANSWERS, 404: NOT_FOUND}, media_type="application/pdf")  # fmt: skip
async def get_credit_note_pdf(request: Request) -> Response:
    return await _document(request, "pdf")
