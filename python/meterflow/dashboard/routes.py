"""The dashboard's URL map under /dashboard, and its vendored static files (uPlot, htmx)."""

from __future__ import annotations

from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from meterflow.dashboard import billing_pages, pages


def dashboard_mount() -> Mount:
    return Mount("/dashboard", routes=[
        Route("/", pages.overview, methods=["GET"]),
        Route("/overview/live", pages.overview_live, methods=["GET"]),
        Route("/signin", pages.signin_form, methods=["GET"]),
        Route("/signin", pages.signin, methods=["POST"]),
        Route("/signout", pages.signout_, methods=["POST"]),
        Route("/customers", pages.customers, methods=["GET"]),
        Route("/customers/{customer_id}", pages.customer, methods=["GET"]),
        Route("/customers/{customer_id}/usage", pages.customer_usage, methods=["GET"]),
        Route("/meters", pages.meters, methods=["GET"]),
        Route("/plans", billing_pages.plans, methods=["GET"]),
        Route("/invoices", billing_pages.invoices, methods=["GET"]),
        Route("/invoices/{invoice_id}", billing_pages.invoice, methods=["GET"]),
        Route("/invoices/{invoice_id}/document.html", billing_pages.invoice_html, methods=["GET"]),
        Route("/invoices/{invoice_id}/document.pdf", billing_pages.invoice_pdf, methods=["GET"]),
        Route("/invoices/{invoice_id}/{action}", billing_pages.transition, methods=["POST"]),
        Route("/keys", pages.keys, methods=["GET"]),
        Route("/keys", pages.create_key, methods=["POST"]),
        Route("/keys/{key_id}/revoke", pages.revoke_key, methods=["POST"]),
        Route("/events", pages.events, methods=["GET"]),
        Mount("/static", StaticFiles(packages=[("meterflow.dashboard", "static")]), name="static"),
    ])  # fmt: skip
