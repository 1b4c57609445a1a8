"""Plans (rate cards): what each meter costs, parsed from JSON or TOML and validated field by field.

A plan has a currency, an interval (calendar `month` or `year`), an optional
`minimum` and a list of charges. A charge is `flat` (a fixed amount per
period) or prices one meter's quantity with a `Price`: `unit`, `graduated`,
`volume` or `package`. A dimensional charge names one of its meter's
`group_by` properties in `price_by` and gives a `Price` per value (`prices`)
and optionally a `default` for the other values.

Every amount and quantity is a decimal string; errors name the field as a
path (`charges[2].tiers[1].up_to`, `charges[3].prices.eu-west-1.unit_amount`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from decimal import Decimal
from typing import Any, Literal

from meterflow.config import ConfigError, Settings, defined_once
from meterflow.kernel.money import MoneyError, decimal_text, minor_unit, money_text, parse_decimal
from meterflow.metering.meters import CODE_RE, Aggregation, Meter

ChargeType = Literal["flat", "unit", "graduated", "volume", "package"]
PriceType = Literal["unit", "graduated", "volume", "package"]
PRICE_TYPES: tuple[PriceType, ...] = ("unit", "graduated", "volume", "package")
Interval = Literal["month", "year"]
INTERVALS: tuple[Interval, ...] = ("month", "year")
# What a usage charge can price: quantities that count or measure something used.
# MIN is refused: the smallest value seen in a period is not an amount of use.
PRICEABLE: tuple[Aggregation, ...] = ("COUNT", "SUM", "MAX", "AVG", "LATEST", "UNIQUE_COUNT", "TIME_WEIGHTED_SUM")

# Prices: at most 15 digits before the point and 12 after. Quantities (tier
# bounds, free units, package sizes): the meters' Decimal128(38, 9) range.
PRICE_PLACES, PRICE_DIGITS = 12, 15
QUANTITY_PLACES, QUANTITY_DIGITS = 9, 29
MAX_CHARGES, MAX_TIERS, MAX_PRICES = 100, 100, 1000
ZERO = Decimal(0)

PLAN_FIELDS = ("code", "name", "description", "currency", "interval", "minimum", "charges")
_PRICE_FIELDS: dict[str, tuple[str, ...]] = {
    "unit": ("type", "unit_amount", "free_units"),
    "graduated": ("type", "tiers"),
    "volume": ("type", "tiers"),
    "package": ("type", "package_size", "package_amount"),
}
_TIER_FIELDS = ("up_to", "unit_amount", "flat_amount")
_DIMENSIONAL_FIELDS = ("meter", "description", "price_by", "prices", "default")


class PlanError(MoneyError):
    """A plan definition is invalid; `field` is the path of the culprit."""


@dataclass(frozen=True)
class Tier:
    """Units up to and including `up_to` (None: no bound, the last tier) cost `unit_amount` each."""

    up_to: Decimal | None
    unit_amount: Decimal = ZERO
    flat_amount: Decimal = ZERO


@dataclass(frozen=True)
class Price:
    """How a quantity becomes money; which fields matter depends on `type`."""

    type: PriceType
    unit_amount: Decimal = ZERO  # unit
    free_units: Decimal = ZERO  # unit
    tiers: tuple[Tier, ...] = ()  # graduated, volume
    package_size: Decimal = Decimal(1)  # package
    package_amount: Decimal = ZERO  # package

    def as_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"type": self.type}
        if self.type == "unit":
            out["unit_amount"] = decimal_text(self.unit_amount)
            if self.free_units:
                out["free_units"] = decimal_text(self.free_units)
        elif self.type == "package":
            out["package_size"] = decimal_text(self.package_size)
            out["package_amount"] = decimal_text(self.package_amount)
        else:
            out["tiers"] = [
                {"up_to": None if t.up_to is None else decimal_text(t.up_to),
                 "unit_amount": decimal_text(t.unit_amount), "flat_amount": decimal_text(t.flat_amount)}
                for t in self.tiers
            ]  # fmt: skip
        return out


@dataclass(frozen=True)
class FlatCharge:
    """A fixed amount per period, prorated when the period is cut short."""

    amount: Decimal
    description: str = ""


@dataclass(frozen=True)
class UsageCharge:
    """A meter's quantity priced by `price`; or, with `price_by`, each value priced on its own.

    For a dimensional charge `prices` maps values of the `price_by` property to
    their price and `price` is the default for other values (None: not billed).
    """

    meter: str
    price: Price | None
    description: str = ""
    price_by: str | None = None
    prices: tuple[tuple[str, Price], ...] = ()


Charge = FlatCharge | UsageCharge


@dataclass(frozen=True)
class Plan:
    code: str
    name: str
    currency: str
    interval: Interval
    charges: tuple[Charge, ...]
    minimum: Decimal = ZERO
    description: str = ""

    def usage_needs(self) -> dict[str, tuple[str, ...]]:
        """The meters the plan prices, each with the properties its quantities must be broken down by."""
        out: dict[str, tuple[str, ...]] = {}
        for c in self.charges:
            if isinstance(c, UsageCharge):
                props = out.setdefault(c.meter, ())
                if c.price_by is not None and c.price_by not in props:
                    out[c.meter] = (*props, c.price_by)
        return out

    def as_json(self) -> dict[str, Any]:
        """The canonical definition; `parse_plan` reads it back to an equal plan."""
        charges: list[dict[str, Any]] = []
        for c in self.charges:
            if isinstance(c, FlatCharge):
                charges.append({"type": "flat", "amount": money_text(c.amount, self.currency),
                                "description": c.description})  # fmt: skip
            elif c.price_by is None:
                assert c.price is not None
                charges.append({**c.price.as_json(), "meter": c.meter, "description": c.description})
            else:
                d: dict[str, Any] = {"meter": c.meter, "description": c.description, "price_by": c.price_by,
                                     "prices": {v: p.as_json() for v, p in c.prices}}  # fmt: skip
                if c.price is not None:
                    d["default"] = c.price.as_json()
                charges.append(d)
        return {
            "code": self.code,
            "name": self.name,
            "description": self.description,
            "currency": self.currency,
            "interval": self.interval,
            "minimum": money_text(self.minimum, self.currency),
            "charges": charges,
        }


def _fields(doc: Any, where: str, allowed: tuple[str, ...], what: str) -> dict[str, Any]:
    if not isinstance(doc, dict):
        message = f"`{where}` must be an object ({what})." if where else "A plan must be an object."
        raise PlanError(where or "plan", message)
    for k in doc:
        if k not in allowed:
            raise PlanError(_join(where, str(k)), f"`{_join(where, str(k))}` is not a field of {what}; "
                            f"the fields are {', '.join(allowed)}.")  # fmt: skip
    return doc


def _join(where: str, name: str) -> str:
    return f"{where}.{name}" if where else name


def _text(doc: Mapping[str, Any], name: str, where: str = "", *, required: bool = False, max_len: int = 255) -> str:
    f = _join(where, name)
    v = doc.get(name)
    if v is None or v == "":
        if required:
            raise PlanError(f, f"`{f}` is required.")
        return ""
    if not isinstance(v, str):
        raise PlanError(f, f"`{f}` must be a string.")
    if len(v) > max_len:
        raise PlanError(f, f"`{f}` is {len(v)} characters; the limit is {max_len}.")
    return v


def _price_amount(doc: Mapping[str, Any], name: str, where: str, *, required: bool) -> Decimal:
    if doc.get(name) is None:
        if required:
            raise PlanError(_join(where, name), f"`{_join(where, name)}` is required.")
        return ZERO
    return parse_decimal(doc[name], _join(where, name), max_places=PRICE_PLACES, max_int_digits=PRICE_DIGITS)


def _quantity(value: Any, field: str) -> Decimal:
    return parse_decimal(value, field, max_places=QUANTITY_PLACES, max_int_digits=QUANTITY_DIGITS)


def _money(value: Any, field: str, currency: str) -> Decimal:
    """An amount billed as is (flat fee, minimum): no more places than the currency has."""
    return parse_decimal(value, field, max_places=minor_unit(currency), max_int_digits=PRICE_DIGITS)


def _tiers(raw: Any, where: str) -> tuple[Tier, ...]:
    f = _join(where, "tiers")
    if not isinstance(raw, list) or not raw:
        raise PlanError(f, f"`{f}` must be a non-empty list of tiers.")
    if len(raw) > MAX_TIERS:
        raise PlanError(f, f"`{f}` has {len(raw)} tiers; the limit is {MAX_TIERS}.")
    tiers: list[Tier] = []
    previous = ZERO
    for i, doc in enumerate(raw):
        tw = f"{f}[{i}]"
        _fields(doc, tw, _TIER_FIELDS, "a tier")
        last = i == len(raw) - 1
        raw_up_to = doc.get("up_to")
        up_to = None if raw_up_to is None else _quantity(raw_up_to, f"{tw}.up_to")
        if up_to is None and not last:
            raise PlanError(f"{tw}.up_to", f"`{tw}.up_to` is missing or null, but only the last tier may be open.")
        if up_to is not None and last:
            raise PlanError(f"{tw}.up_to", f"`{tw}.up_to` must be null (or omitted): the last tier has no upper bound.")
        if up_to is not None and up_to <= previous:
            raise PlanError(f"{tw}.up_to", f"`{tw}.up_to` is {raw_up_to}; tier bounds must be strictly ascending "
                            f"and above {decimal_text(previous)}.")  # fmt: skip
        tiers.append(Tier(up_to, _price_amount(doc, "unit_amount", tw, required=False),
                          _price_amount(doc, "flat_amount", tw, required=False)))  # fmt: skip
        previous = up_to if up_to is not None else previous
    return tuple(tiers)


def _price(doc: Any, where: str, extra: tuple[str, ...]) -> Price:
    """A price body; `extra` are the charge-level fields allowed beside it (`meter`, `description`)."""
    if not isinstance(doc, dict):
        raise PlanError(where, f"`{where}` must be an object (a price).")
    t = doc.get("type")
    if t not in PRICE_TYPES:
        f = _join(where, "type")
        raise PlanError(f, f"`{f}` must be one of {', '.join(PRICE_TYPES)}, got {t!r}.")
    _fields(doc, where, _PRICE_FIELDS[t] + extra, f"a {t} price")
    if t == "unit":
        free = doc.get("free_units")
        return Price("unit", unit_amount=_price_amount(doc, "unit_amount", where, required=True),
                     free_units=ZERO if free is None else _quantity(free, _join(where, "free_units")))  # fmt: skip
    if t == "package":
        f = _join(where, "package_size")
        if doc.get("package_size") is None:
            raise PlanError(f, f"`{f}` is required: the number of units in one package.")
        size = _quantity(doc["package_size"], f)
        if size <= 0:
            raise PlanError(f, f"`{f}` must be positive, got {doc['package_size']!r}.")
        return Price("package", package_size=size,
                     package_amount=_price_amount(doc, "package_amount", where, required=True))  # fmt: skip
    return Price(t, tiers=_tiers(doc.get("tiers"), where))


def _usage_meter(doc: Mapping[str, Any], where: str, meters: Mapping[str, Meter]) -> Meter:
    f = _join(where, "meter")
    code = doc.get("meter")
    if not isinstance(code, str) or not code:
        raise PlanError(f, f"`{f}` is required: the code of the meter this charge prices.")
    meter = meters.get(code)
    if meter is None:
        raise PlanError(f, f"`{f}` names no meter: there is no meter {code!r}.")
    if meter.aggregation not in PRICEABLE:
        raise PlanError(f, f"`{f}` is {code!r}, a {meter.aggregation} meter; a usage charge prices "
                        f"{', '.join(PRICEABLE)} meters.")  # fmt: skip
    return meter


def _charge(doc: Any, where: str, currency: str, meters: Mapping[str, Meter]) -> Charge:
    if not isinstance(doc, dict):
        raise PlanError(where, f"`{where}` must be an object (a charge).")
    if doc.get("type") == "flat":
        _fields(doc, where, ("type", "amount", "description"), "a flat charge")
        f = _join(where, "amount")
        if doc.get("amount") is None:
            raise PlanError(f, f"`{f}` is required: the fixed amount per period.")
        return FlatCharge(_money(doc["amount"], f, currency), _text(doc, "description", where))
    if "price_by" not in doc:
        price = _price(doc, where, ("meter", "description"))
        meter = _usage_meter(doc, where, meters)
        return UsageCharge(meter.code, price, _text(doc, "description", where) or meter.name)
    _fields(doc, where, _DIMENSIONAL_FIELDS, "a dimensional charge (each price in `prices` has its own `type`)")
    meter = _usage_meter(doc, where, meters)
    f = _join(where, "price_by")
    by = doc.get("price_by")
    if not isinstance(by, str) or by not in meter.group_by:
        raise PlanError(f, f"`{f}` must be one of meter {meter.code!r}'s group_by properties "
                        f"({', '.join(meter.group_by) or 'it has none'}), got {by!r}.")  # fmt: skip
    f = _join(where, "prices")
    raw = doc.get("prices")
    if not isinstance(raw, dict) or not raw:
        raise PlanError(f, f"`{f}` must be a non-empty object of {by} value to price.")
    if len(raw) > MAX_PRICES:
        raise PlanError(f, f"`{f}` has {len(raw)} values; the limit is {MAX_PRICES}.")
    prices = tuple((str(v), _price(p, f"{f}.{v}", ())) for v, p in raw.items())
    default = None if doc.get("default") is None else _price(doc["default"], _join(where, "default"), ())
    return UsageCharge(meter.code, default, _text(doc, "description", where) or meter.name, by, prices)


def parse_plan(doc: Any, meters: Mapping[str, Meter]) -> Plan:
    """Validates a plan definition (a JSON object or a TOML table) against the meters it prices.

    Every problem raises PlanError (a FieldError: the API answers 400 with its field and message).
    """
    try:
        return _plan(doc, meters)
    except PlanError:
        raise
    except MoneyError as e:  # amounts and currencies checked by money.py
        raise PlanError(e.field, e.message) from None


def _plan(doc: Any, meters: Mapping[str, Meter]) -> Plan:
    _fields(doc, "", PLAN_FIELDS, "a plan")
    code = _text(doc, "code", required=True, max_len=63)
    if not CODE_RE.fullmatch(code):
        raise PlanError("code", f"`code` {code!r} must be 1 to 63 of a-z, 0-9 and '_', starting with a letter.")
    minor_unit(doc.get("currency"), "currency")
    currency: str = doc["currency"]
    interval = doc.get("interval", "month")
    if interval not in INTERVALS:
        raise PlanError("interval", f"`interval` must be month or year (calendar periods), got {interval!r}.")
    minimum = ZERO if doc.get("minimum") is None else _money(doc["minimum"], "minimum", currency)
    raw = doc.get("charges")
    if not isinstance(raw, list) or not raw:
        raise PlanError("charges", "`charges` must be a non-empty list of charges.")
    if len(raw) > MAX_CHARGES:
        raise PlanError("charges", f"`charges` has {len(raw)} charges; the limit is {MAX_CHARGES}.")
    charges = tuple(_charge(c, f"charges[{i}]", currency, meters) for i, c in enumerate(raw))
    return Plan(
        code=code,
        name=_text(doc, "name") or code,
        description=_text(doc, "description", max_len=2000),
        currency=currency,
        interval=interval,
        minimum=minimum,
        charges=charges,
    )


def configured_plans(settings: Settings, meters: tuple[Meter, ...]) -> tuple[Plan, ...]:
    """The plans of the config's `[[plans]]` tables, priced against the config's meters; a ConfigError
    names the file, the table and the field."""
    source = settings.config or "config"
    by_code = {m.code: m for m in meters}
    out: list[Plan] = []
    for i, doc in enumerate(settings.plans):
        try:
            out.append(parse_plan(doc, by_code))
        except PlanError as e:
            raise ConfigError(f"{source}: plans[{i}].{e.field}: {e.message}") from None
        defined_once(source, "plans", [p.code for p in out])
    return tuple(out)
