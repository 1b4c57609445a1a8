"""The stored (and API) shape of a priced period: its lines through `lines.encode_line`, totals as decimal text."""

from __future__ import annotations

from typing import Any

from meterflow.billing.lines import InvoiceLine, encode_line
from meterflow.billing.rating import PricedPeriod
from meterflow.kernel.money import money_text


def priced_period_json(p: PricedPeriod) -> dict[str, Any]:
    """`period` is the billed part; `billing_period` the calendar period it belongs to (they differ when cut)."""
    cur = p.currency
    return {
        "plan": p.plan,
        "currency": cur,
        "period": {"start": p.period.start, "end": p.period.end},
        "billing_period": {"start": p.period.period.start, "end": p.period.period.end},
        "lines": [encode_line(InvoiceLine.priced(ln), cur) for ln in p.lines],
        "subtotal": money_text(p.subtotal, cur),
        "minimum": money_text(p.minimum, cur),
        "minimum_adjustment": money_text(p.minimum_adjustment, cur),
        "total": money_text(p.total, cur),
    }
