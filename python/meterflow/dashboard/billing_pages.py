"""The dashboard's billing pages: plans, a customer's subscriptions and invoices, the invoices and their lifecycle."""

from __future__ import annotations

import asyncio
from typing import Any

from starlette.requests import Request
from starlette.responses import HTMLResponse, Response

from meterflow.billing.catalog import StoredPlanBroken
from meterflow.billing.closing import Closer
from meterflow.billing.failures import ClosingFailures
from meterflow.billing.invoices import STATUSES, WrongStatus
from meterflow.billing.preview import billing_context, price_service_period
from meterflow.billing.render import priced_period_json
from meterflow.billing.subscriptions import Subscription
from meterflow.dashboard.guard import redirect, signed_in
from meterflow.dashboard.render import page
from meterflow.kernel.clock import now_ms
from meterflow.kernel.ids import ID_RE, ID_RULE, INVOICE_ID_RE
from meterflow.metering.usage import UsageOutOfRange
from meterflow.runtime import Runtime
from meterflow.storage.base import QueryLimitExceeded
from meterflow.web.browser import DOCUMENT_CSP
from meterflow.web.pagination import page_of
from meterflow.web.state import runtime_of
from meterflow.web.views import document_headers, invoice_document

PAGE = 25
ACTIONS = {"finalize": "finalized", "void": "voided", "mark_paid": "marked paid"}


@signed_in
async def plans(request: Request) -> Response:
    rows = await runtime_of(request).plans.list("", 500)
    return page(request, "plans.html", {"plans": [p.as_json() for p in rows]})


async def _upcoming(rt: Runtime, sub: Subscription, now: int) -> dict[str, Any]:
    """One active subscription's upcoming invoice, priced as GET /v1/customers/{id}/upcoming_invoice prices it."""
    try:
        ctx = await billing_context(rt, sub)
        priced = await price_service_period(rt, ctx, ctx.period_at(now))
    except UsageOutOfRange as e:
        return {"subscription_id": sub.id, "error": e.message}
    except QueryLimitExceeded:
        return {"subscription_id": sub.id, "error": "A usage query of this period went over its limits."}
    except StoredPlanBroken as e:
        return {"subscription_id": sub.id, "error": str(e)}
    return {"subscription_id": sub.id, "error": "", **priced_period_json(priced)}


async def billing_of(request: Request, customer_id: str) -> dict[str, Any]:
    """A customer's subscriptions, the upcoming invoice of each active one, and the latest invoices."""
    rt = runtime_of(request)
    now = now_ms()
    subs = await rt.subscriptions.of_customer(customer_id)
    upcoming = await asyncio.gather(*(_upcoming(rt, s, now) for s in subs if s.active_at(now)))
    past = await rt.invoices.list("", PAGE, customer_id, "")
    return {"subscriptions": [s.as_json(now) for s in subs], "upcoming": upcoming, "invoices": past}


@signed_in
async def invoices(request: Request) -> Response:
    q = request.query_params
    customer_id, status, cursor = q.get("customer_id", ""), q.get("status", ""), q.get("cursor", "")
    error = ""
    if customer_id and not ID_RE.fullmatch(customer_id):
        error, customer_id = f"A customer id is {ID_RULE}.", ""
    if status not in ("", *STATUSES):
        error, status = f"The status is one of {', '.join(STATUSES)}.", ""
    if not INVOICE_ID_RE.fullmatch(cursor):
        cursor = ""
    rows = await runtime_of(request).invoices.list(cursor, PAGE + 1, customer_id, status)
    shown = page_of(rows, PAGE)
    failures = await ClosingFailures(runtime_of(request).records).list("", PAGE)
    ctx = {"rows": shown.rows, "customer_id": customer_id, "status": status, "statuses": STATUSES, "cursor": cursor,
           "next_cursor": shown.next_cursor, "error": error, "failures": failures}  # fmt: skip
    template = "invoices_table.html" if request.headers.get("hx-request") else "invoices.html"
    return page(request, template, ctx)


async def _invoice_page(request: Request, notice: str = "", error: str = "", status: int = 200) -> Response:
    iid = str(request.path_params["invoice_id"])
    found = await runtime_of(request).invoices.get(iid) if INVOICE_ID_RE.fullmatch(iid) else None
    if found is None:
        return page(request, "refused.html", {"message": f"There is no invoice {iid[:100]!r}."}, 404)
    customer = await runtime_of(request).customers.get(str(found["customer_id"]))
    return page(request, "invoice.html", {"invoice": found, "customer": customer, "notice": notice,
                                          "error": error}, status)  # fmt: skip


@signed_in
async def invoice(request: Request) -> Response:
    done = request.query_params.get("done", "")
    return await _invoice_page(request, notice=f"The invoice is {ACTIONS[done]}." if done in ACTIONS else "")


async def _transition(request: Request) -> Response:
    iid, action = str(request.path_params["invoice_id"]), str(request.path_params["action"])
    if action not in ACTIONS or not INVOICE_ID_RE.fullmatch(iid):
        return page(request, "refused.html", {"message": f"There is no invoice action {action[:40]!r}."}, 404)
    try:
        done = await Closer(runtime_of(request)).transition(iid, action)
    except WrongStatus as e:
        return await _invoice_page(request, error=f"The invoice is {e.current}; it cannot be {ACTIONS[action]}.",
                                   status=409)  # fmt: skip
    if done is None:
        return page(request, "refused.html", {"message": f"There is no invoice {iid!r}."}, 404)
    return redirect(request, f"/dashboard/invoices/{iid}?done={action}")


transition = signed_in(_transition, "admin")  # as POST /v1/invoices/{id}/finalize, void, mark_paid

# The document is the API's own (GET /v1/invoices/{id}.html and .pdf): a draft's built live by the same
# function, a finalized invoice's the very bytes the API serves.
FRAMED = {"Content-Security-Policy": DOCUMENT_CSP}


@signed_in
async def invoice_html(request: Request) -> Response:
    invoice, body, _ = await invoice_document(request, "html")
    return HTMLResponse(body, headers={**FRAMED, **document_headers(invoice, "html"), "Cache-Control": "no-store"})


@signed_in
async def invoice_pdf(request: Request) -> Response:
    invoice, pdf, _ = await invoice_document(request, "pdf")
    return Response(
        pdf, media_type="application/pdf", headers={**document_headers(invoice, "pdf"), "Cache-Control": "no-store"}
    )
