"""/v1/invoices: list, read, and the lifecycle transitions finalize, void and mark_paid."""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import Response

from meterflow.api.openapi import PAGE, Param, operation
from meterflow.billing.closing import Closer
from meterflow.billing.credit_notes import CreditAmountInvalid, CreditExceedsInvoice
from meterflow.billing.invoices import STATUSES, Invoices, WrongStatus
from meterflow.kernel.money import MoneyError, parse_decimal
from meterflow.web.errors import ApiError, or_not_found
from meterflow.web.pagination import page_params, page_response
from meterflow.web.params import id_filter
from meterflow.web.responses import json_body, json_response
from meterflow.web.state import runtime_of
from meterflow.web.views import document_headers, document_response, invoice_document, invoice_id_of

NOT_FOUND = "There is no such invoice."


def _store(request: Request) -> Invoices:
    return runtime_of(request).invoices


@operation("List invoices, in id order", {200: "A page of invoices", 400: "A parameter is invalid."},
           result="Page", params=(*PAGE, Param("customer_id", "Only this customer's invoices."),
                                  Param("status", f"Only this status: {', '.join(STATUSES)}.")))  # fmt: skip
async def list_invoices(request: Request) -> Response:
    limit, cursor = page_params(request)
    customer_id, status = id_filter(request, "customer_id"), request.query_params.get("status", "")
    if status and status not in STATUSES:
        raise ApiError("invalid_parameter", f"`status` must be one of {', '.join(STATUSES)}, got {status[:40]!r}.")
    rows = await _store(request).list(cursor, limit + 1, customer_id, status)
    return page_response(rows, limit)


@operation("Get an invoice", {200: "The invoice", 404: NOT_FOUND}, result="Invoice")
async def get_invoice(request: Request) -> Response:
    iid = invoice_id_of(request)
    invoice = or_not_found(await _store(request).get(iid), "invoice_not_found", f"There is no invoice {iid!r}.")
    return json_response(invoice)


DOCUMENT_ANSWERS = {404: NOT_FOUND, 304: "`If-None-Match` names the frozen document's ETag (its SHA-256); no body."}


@operation("The invoice as an HTML page (the same content as the PDF); once finalized, the same bytes every time",
           {200: "The page (with `ETag` once finalized)", **DOCUMENT_ANSWERS}, media_type="text/html")  # fmt: skip
async def get_invoice_html(request: Request) -> Response:
    invoice, body, sha = await invoice_document(request, "html")
    return document_response(request, body, "text/html; charset=utf-8", document_headers(invoice, "html"), sha)


@operation("The invoice as a PDF, typeset with Typst; once finalized, the same bytes every time",
           {200: "The PDF (with `ETag` once finalized)", **DOCUMENT_ANSWERS}, media_type="application/pdf")  # fmt: skip
async def get_invoice_pdf(request: Request) -> Response:
    invoice, body, sha = await invoice_document(request, "pdf")
    return document_response(request, body, "application/pdf", document_headers(invoice, "pdf"), sha)


async def _transition(request: Request, action: str) -> Response:
    iid = invoice_id_of(request)
    try:
        invoice = await Closer(runtime_of(request)).transition(iid, action)
    except WrongStatus as e:
        message = f"The invoice is {e.current}; {action} is not possible from it."
        raise ApiError("invalid_status", message) from None
    if invoice is None:
        raise ApiError("invoice_not_found", f"There is no invoice {iid!r}.")
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
    iid = invoice_id_of(request)
    doc = await json_body(request)
    if not isinstance(doc, dict) or set(doc) - {"amount", "memo"}:
        extra = sorted(set(doc) - {"amount", "memo"})[0] if isinstance(doc, dict) else None
        raise ApiError("invalid_credit_note", f"`{extra}` is not a field here; the fields are amount and memo."
                       if extra else "The body must be a JSON object.")  # fmt: skip
    memo = doc.get("memo") or ""
    if not isinstance(memo, str) or len(memo) > 1000:
        raise ApiError("invalid_credit_note", "`memo` must be a string of at most 1000 characters.")
    amount = None
    if doc.get("amount") is not None:
        try:
            amount = parse_decimal(doc["amount"], "amount", max_places=4, max_int_digits=15)
        except MoneyError as e:
            raise ApiError("invalid_credit_note", e.message) from None
    try:
        note = await runtime_of(request).credit_notes.create_manual(iid, amount, memo)
    except WrongStatus as e:
        raise ApiError("invalid_status", f"The invoice is {e.current}; only a finalized or paid invoice "
                       "can be credited.") from None  # fmt: skip
    except CreditExceedsInvoice as e:
        raise ApiError("credit_exceeds_invoice", str(e)) from None
    except CreditAmountInvalid as e:
        raise ApiError("invalid_credit_note", str(e)) from None
    if note is None:
        raise ApiError("invoice_not_found", f"There is no invoice {iid!r}.")
    return json_response(note, 201)
