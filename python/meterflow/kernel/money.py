"""Money: ISO 4217 currencies, exact Decimal arithmetic, half-up rounding and decimal text.

Prices and quantities are parsed from decimal strings only (never floats) and
computed in `EXACT`, a local context that traps any inexact operation, so an
amount is exact until `round_money` rounds it, once, to the currency's minor
unit. JSON carries the results as decimal strings without exponents.
"""

from __future__ import annotations

import re
from decimal import (
    ROUND_HALF_UP,
    Context,
    Decimal,
    DivisionByZero,
    Inexact,
    InvalidOperation,
    Overflow,
)

from meterflow.kernel.errors import FieldError

# ISO 4217 active codes by minor unit (decimal places). Codes not listed are refused.
_BY_MINOR_UNIT = {
    0: "BIF CLP DJF GNF ISK JPY KMF KRW PYG RWF UGX UYI VND VUV XAF XOF XPF",
    2: "AED AFN ALL AMD ANG AOA ARS AUD AWG AZN BAM BBD BDT BGN BMD BND BOB BRL BSD BTN BWP BYN BZD CAD CDF CHF "
    "CNY COP CRC CUP CVE CZK DKK DOP DZD EGP ERN ETB EUR FJD FKP GBP GEL GHS GIP GMD GTQ GYD HKD HNL HTG HUF "
    "IDR ILS INR IRR JMD KES KGS KHR KPW KYD KZT LAK LBP LKR LRD LSL MAD MDL MGA MKD MMK MNT MOP MRU MUR MVR "
    "MWK MXN MYR MZN NAD NGN NIO NOK NPR NZD PAB PEN PGK PHP PKR PLN QAR RON RSD RUB SAR SBD SCR SDG SEK SGD "
    "SHP SLE SOS SRD SSP STN SVC SYP SZL THB TJS TMT TOP TRY TTD TWD TZS UAH USD UYU UZS VED VES XCD XCG YER "
    "ZAR ZMW ZWG",
    3: "BHD IQD JOD KWD LYD OMR TND",
    4: "CLF UYW",
}
MINOR_UNITS: dict[str, int] = {code: places for places, codes in _BY_MINOR_UNIT.items() for code in codes.split()}

# Prices and quantities have at most 15 + 12 and 29 + 9 digits, so every product
# and sum the pricer forms fits in 100 digits exactly; `Inexact` would be a bug.
EXACT = Context(prec=100, rounding=ROUND_HALF_UP, traps=[Inexact, InvalidOperation, DivisionByZero, Overflow])
# For the one deliberate rounding step (quantize), which signals Inexact by design.
_ROUNDING = Context(prec=100, rounding=ROUND_HALF_UP, traps=[InvalidOperation, Overflow])
_DECIMAL_RE = re.compile(r"([0-9]+)(?:\.([0-9]+))?")  # ASCII digits only: \d also matches "٣"


class MoneyError(FieldError):
    """An amount, quantity or currency in a document is invalid."""


def minor_unit(currency: str, field: str = "currency") -> int:
    """The currency's decimal places (2 for EUR, 0 for JPY, 3 for KWD); unknown codes raise MoneyError."""
    places = MINOR_UNITS.get(currency) if isinstance(currency, str) else None
    if places is None:
        raise MoneyError(
            field, f"`{field}` must be an ISO 4217 currency code in capitals such as EUR, USD or JPY, got {currency!r}."
        )
    return places


def round_money(amount: Decimal, currency: str) -> Decimal:
    """Rounds to the currency's minor unit, half up (a tie goes away from zero): 0.125 EUR is 0.13."""
    return amount.quantize(Decimal(1).scaleb(-minor_unit(currency)), rounding=ROUND_HALF_UP, context=_ROUNDING)


def round_ratio(amount: Decimal, num: int, den: int, currency: str) -> Decimal:
    """`amount * num / den` rounded half up to the minor unit, exactly (integer arithmetic, no inexact division).

    `amount` must be non-negative and have at most the currency's decimal places; `den` positive.
    """
    places = minor_unit(currency)
    scaled = amount.scaleb(places, context=EXACT)
    if scaled != scaled.to_integral_value() or scaled < 0 or num < 0 or den <= 0:
        raise ValueError(f"round_ratio({amount}, {num}, {den}, {currency}): amount in whole minor units, ratio >= 0")
    n = int(scaled) * num
    return Decimal((2 * n + den) // (2 * den)).scaleb(-places, context=EXACT)


def parse_decimal(value: object, field: str, *, max_places: int, max_int_digits: int) -> Decimal:
    """A non-negative decimal from its string form ("12.50"); refuses numbers, signs, exponents and blanks.

    JSON and TOML numbers are refused, not converted: a float has already lost
    digits by the time it arrives, and one rule for all numbers is easier to
    state than "integers yes, floats no".
    """
    if isinstance(value, bool) or not isinstance(value, str):
        kind = "a number" if isinstance(value, int | float) and not isinstance(value, bool) else type(value).__name__
        raise MoneyError(field, f'`{field}` must be a decimal string such as "12.50", not {kind}.')
    m = _DECIMAL_RE.fullmatch(value)
    if m is None:
        raise MoneyError(
            field,
            f"`{field}` must be a non-negative decimal string of digits and at most one point "
            f"(no sign, exponent or spaces), got {value!r}.",
        )
    int_digits, places = len(m.group(1).lstrip("0")), len(m.group(2) or "")
    if places > max_places:
        raise MoneyError(field, f"`{field}` has {places} decimal places; the limit is {max_places}.")
    if int_digits > max_int_digits:
        raise MoneyError(field, f"`{field}` has {int_digits} digits before the point; the limit is {max_int_digits}.")
    return Decimal(value)


def decimal_text(d: Decimal) -> str:
    """A finite Decimal as JSON text: fixed point, no exponent, no trailing zeros ("1E+3" -> "1000", "2.50" ->
    "2.5"), every digit kept: `format(d, "f")` never rounds (`normalize` would, to its context's precision)."""
    text = format(d, "f")
    if "." in text:
        text = text.rstrip("0").rstrip(".")
    return "0" if text == "-0" else text


def money_text(amount: Decimal, currency: str) -> str:
    """An amount as JSON text with exactly the currency's decimal places ("49.00", "5" for JPY, "0.125" for KWD)."""
    r = round_money(amount, currency)
    return format(r.copy_abs() if r.is_zero() else r, "f")
