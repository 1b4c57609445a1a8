"""The snapshot frozen in an invoice at finalization: everything its document shows that lives outside the invoice.

Seller, buyer, time zone, locale and meter units are read once, when the
invoice is finalized, and kept in its document under `"snapshot"`; the frozen
document (billing/documents.py's `build_frozen`) is built from it alone, so a
later edit of the customer, the seller settings or a meter changes nothing on
an invoice already issued. The invoice's own lines, plan and totals are
frozen in it already.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from meterflow.config import Settings
from meterflow.customers import Customers
from meterflow.metering.catalog import MeterCatalog


def seller_address(settings: Settings) -> list[str]:
    """`MF_INVOICE_SELLER_ADDRESS` as lines: split on "|", each stripped, blanks dropped."""
    return [x.strip() for x in settings.invoice_seller_address.split("|") if x.strip()]


async def meter_units(meters: MeterCatalog, invoice: Mapping[str, Any]) -> dict[str, str]:
    """The unit of each meter the invoice's lines name, as the catalog has it now ("" for a deleted meter)."""
    units: dict[str, str] = {}
    for code in sorted({ln["meter"] for ln in invoice["lines"] if ln.get("meter")}):
        meter = await meters.get(code)
        units[code] = meter.unit if meter is not None else ""
    return units


async def take_snapshot(
    customers: Customers, meters: MeterCatalog, settings: Settings, invoice: Mapping[str, Any]
) -> dict[str, Any]:
    """The JSON-safe snapshot of `invoice` (the API's shape) as things are now.

    A deleted customer reads as no name and no email (the id stays); a deleted meter as no unit.
    """
    customer = await customers.get(invoice["customer_id"]) or {}
    units = await meter_units(meters, invoice)
    return {
        "seller": {"name": settings.invoice_seller_name, "address": seller_address(settings)},
        "buyer": {"id": invoice["customer_id"], "name": customer.get("name"), "email": customer.get("email")},
        "timezone": customer.get("timezone") or "UTC",
        "locale": settings.invoice_locale,
        "units": units,
    }
