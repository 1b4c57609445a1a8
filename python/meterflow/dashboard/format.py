"""How the dashboard writes numbers, times and sizes for people: thousands separators, units, UTC times."""

from __future__ import annotations

import datetime as dt
from decimal import Decimal, localcontext

import orjson
from babel.numbers import UnknownCurrencyError, format_currency

from meterflow.billing.documents import FORMAT_CONTEXT
from meterflow.kernel.money import decimal_text

NONE = "\u2013"  # an en dash where there is no value


def number(value: int | float | Decimal | str | None, places: int | None = None) -> str:
    """1234567.5 -> '1,234,567.5'; exact for Decimals and decimal strings (no float on the way)."""
    if value is None:
        return NONE
    if isinstance(value, str):
        value = Decimal(value)
    if isinstance(value, Decimal):
        with localcontext(FORMAT_CONTEXT):  # every value the rules allow (38 digits), not the default 28
            text = decimal_text(value if places is None else round(value, places))
        whole, _, frac = text.partition(".")
        sign = "-" if whole.startswith("-") else ""
        grouped = f"{int(whole.lstrip('-') or 0):,}"
        return sign + grouped + ("." + frac if frac else "")
    if isinstance(value, int):
        return f"{value:,}"
    return f"{value:,.{2 if places is None else places}f}"


def quantity(value: Decimal | int | None, unit: str = "") -> str:
    return number(value) + (f" {unit}" if unit and value is not None else "")


def millis(seconds: float | None) -> str:
    return NONE if seconds is None else f"{seconds * 1000:,.1f} ms"


def size(n: int | None) -> str:
    if n is None:
        return NONE
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:,} {unit}" if unit == "B" else f"{n:,.1f} {unit}"
        n /= 1024  # type: ignore[assignment]
    raise AssertionError


def when(epoch_ms: int | None) -> str:
    """An instant as 'YYYY-MM-DD HH:MM:SS UTC'."""
    if epoch_ms is None:
        return "never"
    t = dt.datetime.fromtimestamp(epoch_ms / 1000, dt.UTC)
    return t.strftime("%Y-%m-%d %H:%M:%S UTC")


def money(amount: str | Decimal | None, currency: str) -> str:
    """An amount in the currency's format: '€1,234.50', '¥1,234'; unit prices keep every digit ('€0.0004')."""
    if amount is None or amount == "":
        return NONE
    try:
        with localcontext(FORMAT_CONTEXT):
            return format_currency(Decimal(amount), currency, locale="en_US", decimal_quantization=False)
    except UnknownCurrencyError:
        return f"{number(Decimal(amount))} {currency}"


def day(epoch_ms: int | None) -> str:
    """A date as 'YYYY-MM-DD' (UTC)."""
    if epoch_ms is None:
        return NONE
    return dt.datetime.fromtimestamp(epoch_ms / 1000, dt.UTC).strftime("%Y-%m-%d")


def _default(obj: object) -> object:
    if isinstance(obj, Decimal):
        return orjson.Fragment(decimal_text(obj))
    raise TypeError


def json_script(data: object) -> str:
    """JSON safe inside <script type="application/json">: no '<', '>' or '&' can end the element."""
    text = orjson.dumps(data, default=_default).decode()
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


FILTERS = {
    "day": day,
    "money": money,
    "number": number,
    "quantity": quantity,
    "millis": millis,
    "size": size,
    "when": when,
}
