"""The pricing core: plans, billing periods, rating and money, against an independent reference.

`pricing_reference` is written from issue 12's text in fractions; the
Hypothesis tests price random plans (every charge type, dimensional prices,
minimums, EUR/JPY/KWD, cut periods and boundary quantities) with both and
compare every line. Proration cases are computed by hand in the tests.
"""

from __future__ import annotations

import copy
import itertools
import tomllib
from collections.abc import Callable
from datetime import datetime
from decimal import Decimal
from fractions import Fraction
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from meterflow.billing.periods import (
    Period,
    ServicePeriod,
    cut,
    period_containing,
    periods_between,
    service_periods,
)
from meterflow.billing.plans import Plan, PlanError, parse_plan
from meterflow.billing.rating import Line, MeterUsage, PricedPeriod, UsageMissing, price_period
from meterflow.billing.render import priced_period_json
from meterflow.kernel.errors import FieldError
from meterflow.kernel.money import MINOR_UNITS, MoneyError, decimal_text, money_text, round_money, round_ratio
from meterflow.metering.meters import DEFAULT_METERS, parse_meter
from meterflow.metering.windows import spans
from tests.harness.pricing_reference import ISSUE_PLAN, MINOR, half_up, reference_price

METERS = {m.code: m for m in (parse_meter(d, "config") for d in DEFAULT_METERS)}
METERS["lowest_temp"] = parse_meter(
    {"code": "lowest_temp", "event_type": "sensor", "aggregation": "MIN", "property": "celsius"}, "config"
)
METERS["seats"] = parse_meter(
    {"code": "seats", "event_type": "seat", "aggregation": "UNIQUE_COUNT", "property": "user_id"}, "config"
)
BERLIN = ZoneInfo("Europe/Berlin")
HOUR = 3_600_000
DAY = 24 * HOUR

FULL_MONTH = ServicePeriod(Period(0, 30 * DAY), 0, 30 * DAY)


def local_ms(tz: ZoneInfo, y: int, mo: int, d: int, h: int = 0, mi: int = 0, s: int = 0) -> int:
    return int(datetime(y, mo, d, h, mi, s, tzinfo=tz).timestamp()) * 1000


def utc_ms(y: int, mo: int, d: int, h: int = 0) -> int:
    return local_ms(ZoneInfo("UTC"), y, mo, d, h)


def usage_of(totals: dict[str, str], by: dict[str, dict[str, dict[str, str]]] | None = None) -> dict[str, MeterUsage]:
    by = by or {}
    return {
        m: MeterUsage(Decimal(t), {p: {v: Decimal(q) for v, q in vs.items()} for p, vs in by.get(m, {}).items()})
        for m, t in totals.items()
    }


def amounts(p: PricedPeriod) -> list[str]:
    return [money_text(ln.amount, p.currency) for ln in p.lines]


# --- the issue's plan, by hand ------------------------------------------------------


def test_issue_plan_priced_by_hand() -> None:
    plan = parse_plan(ISSUE_PLAN, METERS)
    usage = usage_of(
        {"api_calls": "12500", "bandwidth": "1500000000", "compute_time": "4000000", "storage_peak": "250"},
        {"api_calls": {"region": {"eu-west-1": "2000", "us-east-1": "150", "ap-south-1": "7", "": "3"}}},
    )
    p = price_period(plan, usage, FULL_MONTH)
    # flat 49.00; unit (12500 - 10000) x 0.0004 = 1.00; graduated 5e8 x 0.00000002 = 10.00;
    # volume: 4e6 > 3.6e6 so all units at 0.000008 = 32.00; package: 3 started blocks x 5.00 = 15.00;
    # eu 2000 x 0.001 = 2.00; us: 1.00 flat + 50 x 0.002 = 1.10; others by default: "" 3 x 0.0005 = 0.0015
    # -> 0.00, ap-south-1 7 x 0.0005 = 0.0035 -> 0.00 (values in `prices` order, then sorted).
    assert amounts(p) == ["49.00", "1.00", "10.00", "32.00", "15.00", "2.00", "1.10", "0.00", "0.00"]
    assert [ln.dimension for ln in p.lines[5:]] == [
        ("region", "eu-west-1"),
        ("region", "us-east-1"),
        ("region", ""),
        ("region", "ap-south-1"),
    ]
    assert p.lines[4].packages == 3
    assert (p.subtotal, p.minimum_adjustment, p.total) == (Decimal("110.10"), Decimal("0.00"), Decimal("110.10"))
    doc = priced_period_json(p)
    # Line keys: the charge's position, with the value of a dimensional charge.
    assert [ln["line_key"] for ln in doc["lines"]] == [
        "0", "1", "2", "3", "4", "5:region=eu-west-1", "5:region=us-east-1", "5:region=", "5:region=ap-south-1"]
    assert doc["lines"][1] == {
        "line_key": "1",
        "charge": "unit", "meter": "api_calls", "description": "API calls", "quantity": "12500", "amount": "1.00",
        "tiers": [{"up_to": "10000", "quantity": "10000", "unit_amount": "0", "flat_amount": "0", "amount": "0"},
                  {"up_to": None, "quantity": "2500", "unit_amount": "0.0004", "flat_amount": "0", "amount": "1"}],
    }  # fmt: skip
    assert doc["lines"][4]["packages"] == "3" and doc["lines"][4]["amount"] == "15.00"
    assert doc["lines"][6]["dimension"] == {"region": "us-east-1"}
    assert doc["lines"][6]["tiers"][0] == {"up_to": "100", "quantity": "100", "unit_amount": "0",
                                           "flat_amount": "1", "amount": "1"}  # fmt: skip
    assert (doc["subtotal"], doc["minimum_adjustment"], doc["total"]) == ("110.10", "0.00", "110.10")


def test_minimum_tops_up_an_idle_month() -> None:
    plan = parse_plan(ISSUE_PLAN, METERS)
    zero = usage_of({"api_calls": "0", "bandwidth": "0", "compute_time": "0", "storage_peak": "0"},
                    {"api_calls": {"region": {}}})  # fmt: skip
    p = price_period(plan, zero, FULL_MONTH)
    # Only the flat fee: graduated and volume first tiers are not reached at 0; listed regions show 0.
    assert amounts(p) == ["49.00", "0.00", "0.00", "0.00", "0.00", "0.00", "0.00"]
    assert (p.subtotal, p.minimum_adjustment, p.total) == (Decimal("49.00"), Decimal("51.00"), Decimal("100.00"))


def test_usage_missing_for_a_priced_meter_is_an_error_not_zero() -> None:
    plan = parse_plan(ISSUE_PLAN, METERS)
    assert plan.usage_needs() == {"api_calls": ("region",), "bandwidth": (), "compute_time": (),
                                  "storage_peak": ()}  # fmt: skip
    with pytest.raises(UsageMissing, match="compute_time"):
        price_period(plan, usage_of({"api_calls": "1", "bandwidth": "1", "storage_peak": "1"}), FULL_MONTH)
    with pytest.raises(UsageMissing, match="region"):
        price_period(plan, usage_of({m: "1" for m in plan.usage_needs()}), FULL_MONTH)


def test_dimensional_charge_without_default_bills_only_listed_values() -> None:
    doc = {"code": "d", "currency": "USD", "charges": [
        {"meter": "bandwidth", "price_by": "region", "prices": {"eu": {"type": "unit", "unit_amount": "0.5"}}}]}  # fmt: skip
    p = price_period(parse_plan(doc, METERS), usage_of({"bandwidth": "30"}, {"bandwidth": {"region": {"eu": "10", "us": "20"}}}),
                     FULL_MONTH)  # fmt: skip
    assert [(ln.dimension, ln.amount) for ln in p.lines] == [(("region", "eu"), Decimal("5.00"))]


def test_negative_quantity_prices_as_zero_and_shows_the_quantity() -> None:
    doc = {"code": "n", "currency": "EUR", "charges": [{"type": "unit", "meter": "bandwidth", "unit_amount": "1"}]}
    p = price_period(parse_plan(doc, METERS), usage_of({"bandwidth": "-5"}), FULL_MONTH)
    assert (p.lines[0].quantity, p.lines[0].amount, p.total) == (Decimal(-5), Decimal("0.00"), Decimal("0.00"))


@pytest.mark.parametrize("quantity", ["0.0000000001", "1E+29", "-1E+30", "NaN", "Infinity"])
def test_quantities_outside_decimal128_9_are_refused(quantity: str) -> None:
    doc = {"code": "n", "currency": "EUR", "charges": [{"type": "unit", "meter": "bandwidth", "unit_amount": "1"}]}
    with pytest.raises(ValueError, match="Decimal128"):
        price_period(parse_plan(doc, METERS), usage_of({"bandwidth": quantity}), FULL_MONTH)


def test_unique_count_meters_are_priceable() -> None:
    doc = {"code": "s", "currency": "EUR", "charges": [{"type": "unit", "meter": "seats", "unit_amount": "12.5"}]}
    p = price_period(parse_plan(doc, METERS), usage_of({"seats": "3"}), FULL_MONTH)
    assert p.total == Decimal("37.50")


def test_plan_loads_from_toml_with_open_tiers_omitting_up_to() -> None:
    doc = tomllib.loads("""
[[plans]]
code = "pro"
currency = "JPY"
minimum = "1000"
[[plans.charges]]
type = "graduated"
meter = "api_calls"
tiers = [{up_to = "1000", unit_amount = "0"}, {unit_amount = "0.5", flat_amount = "100"}]
[[plans.charges]]
meter = "storage_peak"
price_by = "region"
default = {type = "package", package_size = "10", package_amount = "300"}
[plans.charges.prices.eu-west-1]
type = "unit"
unit_amount = "25"
""")["plans"][0]
    plan = parse_plan(doc, METERS)
    assert plan.charges[0].price.tiers[1].up_to is None  # type: ignore[union-attr]
    usage = usage_of({"api_calls": "1003", "storage_peak": "0"}, {"storage_peak": {"region": {"us": "11"}}})
    p = price_period(plan, usage, FULL_MONTH)
    # graduated: 3 x 0.5 + 100 = 101.5 -> 102 (JPY, half up); eu-west-1 0 -> 0; us: 2 packages x 300 = 600
    assert amounts(p) == ["102", "0", "600"]
    assert (p.subtotal, p.minimum_adjustment, p.total) == (Decimal(702), Decimal(298), Decimal(1000))


def test_plan_json_reads_back_to_an_equal_plan() -> None:
    plan = parse_plan(ISSUE_PLAN, METERS)
    assert parse_plan(plan.as_json(), METERS) == plan
    assert plan.as_json()["charges"][0] == {"type": "flat", "amount": "49.00", "description": "Platform fee"}


# --- validation ---------------------------------------------------------------------


def _set(path: list[Any], value: Any) -> Callable[[dict[str, Any]], None]:
    def apply(doc: dict[str, Any]) -> None:
        target: Any = doc
        for p in path[:-1]:
            target = target[p]
        if value is _DELETE:
            del target[path[-1]]
        else:
            target[path[-1]] = value

    return apply


_DELETE = object()
BAD_PLANS: list[tuple[str, Callable[[dict[str, Any]], None], str]] = [
    ("bad code", _set(["code"], "Pro Plan"), "code"),
    ("unknown plan field", _set(["tax"], "0.2"), "tax"),
    ("unknown currency", _set(["currency"], "XYZ"), "currency"),
    ("lower-case currency", _set(["currency"], "eur"), "currency"),
    ("interval", _set(["interval"], "week"), "interval"),
    ("negative minimum", _set(["minimum"], "-1.00"), "minimum"),
    ("minimum finer than cents", _set(["minimum"], "100.001"), "minimum"),
    ("no charges", _set(["charges"], []), "charges"),
    ("flat amount finer than cents", _set(["charges", 0, "amount"], "49.001"), "charges[0].amount"),
    ("flat charge with a meter", _set(["charges", 0, "meter"], "api_calls"), "charges[0].meter"),
    ("unknown charge type", _set(["charges", 1, "type"], "tiered"), "charges[1].type"),
    ("unknown meter", _set(["charges", 1, "meter"], "nope"), "charges[1].meter"),
    ("MIN meter", _set(["charges", 1, "meter"], "lowest_temp"), "charges[1].meter"),
    ("missing unit amount", _set(["charges", 1, "unit_amount"], _DELETE), "charges[1].unit_amount"),
    ("negative unit amount", _set(["charges", 1, "unit_amount"], "-0.1"), "charges[1].unit_amount"),
    ("float unit amount", _set(["charges", 1, "unit_amount"], 0.0004), "charges[1].unit_amount"),
    ("integer unit amount", _set(["charges", 1, "unit_amount"], 1), "charges[1].unit_amount"),
    ("exponent unit amount", _set(["charges", 1, "unit_amount"], "4E-4"), "charges[1].unit_amount"),
    ("blank around unit amount", _set(["charges", 1, "unit_amount"], " 0.0004"), "charges[1].unit_amount"),
    ("trailing point", _set(["charges", 1, "unit_amount"], "1."), "charges[1].unit_amount"),
    ("NaN", _set(["charges", 1, "unit_amount"], "NaN"), "charges[1].unit_amount"),
    ("non-ASCII digits", _set(["charges", 1, "unit_amount"], "\u0663"), "charges[1].unit_amount"),
    ("13 decimal places", _set(["charges", 1, "unit_amount"], "0.0000000000001"), "charges[1].unit_amount"),
    ("16 integer digits", _set(["charges", 1, "unit_amount"], "1000000000000000"), "charges[1].unit_amount"),
    ("free units 10 places", _set(["charges", 1, "free_units"], "0.0000000001"), "charges[1].free_units"),
    ("free units on graduated", _set(["charges", 2, "free_units"], "5"), "charges[2].free_units"),
    ("no tiers", _set(["charges", 2, "tiers"], []), "charges[2].tiers"),
    ("tiers not ascending", _set(["charges", 2, "tiers"], [{"up_to": "100"}, {"up_to": "100"}, {"up_to": None}]),
     "charges[2].tiers[1].up_to"),
    ("descending tiers", _set(["charges", 2, "tiers"], [{"up_to": "100"}, {"up_to": "99.5"}, {}]),
     "charges[2].tiers[1].up_to"),
    ("first bound zero", _set(["charges", 2, "tiers", 0, "up_to"], "0"), "charges[2].tiers[0].up_to"),
    ("middle tier open", _set(["charges", 2, "tiers", 0, "up_to"], None), "charges[2].tiers[0].up_to"),
    ("last tier closed", _set(["charges", 3, "tiers", 1, "up_to"], "99999999"), "charges[3].tiers[1].up_to"),
    ("unknown tier field", _set(["charges", 2, "tiers", 0, "price"], "1"), "charges[2].tiers[0].price"),
    ("negative flat amount in tier", _set(["charges", 3, "tiers", 0, "flat_amount"], "-5"),
     "charges[3].tiers[0].flat_amount"),
    ("package size zero", _set(["charges", 4, "package_size"], "0"), "charges[4].package_size"),
    ("package size number", _set(["charges", 4, "package_size"], 100), "charges[4].package_size"),
    ("package amount missing", _set(["charges", 4, "package_amount"], _DELETE), "charges[4].package_amount"),
    ("price_by not a group_by", _set(["charges", 5, "price_by"], "country"), "charges[5].price_by"),
    ("dimensional with type", _set(["charges", 5, "type"], "unit"), "charges[5].type"),
    ("empty prices", _set(["charges", 5, "prices"], {}), "charges[5].prices"),
    ("bad value price", _set(["charges", 5, "prices", "eu-west-1", "unit_amount"], "x"),
     "charges[5].prices.eu-west-1.unit_amount"),
    ("nested meter in a value price", _set(["charges", 5, "prices", "eu-west-1", "meter"], "bandwidth"),
     "charges[5].prices.eu-west-1.meter"),
    ("bad default tiers", _set(["charges", 5, "default"], {"type": "volume", "tiers": [{"up_to": "5"}]}),
     "charges[5].default.tiers[0].up_to"),
]  # fmt: skip


@pytest.mark.parametrize(("case", "mutate", "field"), BAD_PLANS, ids=[c[0] for c in BAD_PLANS])
def test_invalid_plans_name_the_field(case: str, mutate: Callable[[dict[str, Any]], None], field: str) -> None:
    doc = copy.deepcopy(ISSUE_PLAN)
    mutate(doc)
    with pytest.raises(PlanError) as e:
        parse_plan(doc, METERS)
    assert e.value.field == field
    assert f"`{field}`" in e.value.message, e.value.message
    assert e.value.message.endswith(".") and "\n" not in e.value.message


def test_a_plan_that_is_not_an_object_is_refused() -> None:
    with pytest.raises(PlanError) as e:
        parse_plan(["pro"], METERS)
    assert e.value.field == "plan"


def test_jpy_and_kwd_amounts_follow_their_minor_units() -> None:
    doc = copy.deepcopy(ISSUE_PLAN)
    doc["currency"], doc["minimum"], doc["charges"][0]["amount"] = "JPY", "10000", "4900.5"
    with pytest.raises(MoneyError) as e:
        parse_plan(doc, METERS)
    assert e.value.field == "charges[0].amount"
    doc["currency"], doc["minimum"], doc["charges"][0]["amount"] = "KWD", "10.125", "4.905"
    assert parse_plan(doc, METERS).minimum == Decimal("10.125")


# --- money --------------------------------------------------------------------------


@pytest.mark.parametrize(("amount", "currency", "rounded"), [
    ("0.005", "EUR", "0.01"), ("0.0049999999", "EUR", "0.00"), ("2.675", "USD", "2.68"), ("0.125", "EUR", "0.13"),
    ("0.5", "JPY", "1"), ("1.4999", "JPY", "1"), ("2.5", "KRW", "3"), ("0.0005", "KWD", "0.001"),
    ("0.00049", "KWD", "0.000"), ("1.2345", "BHD", "1.235"), ("0", "EUR", "0.00"), ("12E+3", "EUR", "12000.00"),
])  # fmt: skip
def test_round_money_is_half_up_to_the_minor_unit(amount: str, currency: str, rounded: str) -> None:
    assert money_text(round_money(Decimal(amount), currency), currency) == rounded


def test_money_table_covers_the_common_currencies() -> None:
    assert {c: MINOR_UNITS[c] for c in ("EUR", "USD", "GBP", "CHF", "JPY", "KRW", "KWD", "BHD", "OMR", "JOD", "TND")} \
        == MINOR  # fmt: skip
    with pytest.raises(MoneyError):
        round_money(Decimal(1), "XXX")


def test_round_ratio_refuses_amounts_finer_than_the_minor_unit() -> None:
    assert round_ratio(Decimal("10.00"), 1, 8, "EUR") == Decimal("1.25")
    assert round_ratio(Decimal("0.01"), 1, 2, "EUR") == Decimal("0.01")  # 0.005, half up
    with pytest.raises(ValueError):
        round_ratio(Decimal("0.001"), 1, 1, "EUR")


@given(st.decimals(allow_nan=False, allow_infinity=False))
def test_decimal_text_is_plain_and_exact(d: Decimal) -> None:
    text = decimal_text(d)
    assert "E" not in text and "e" not in text
    assert Decimal(text) == d
    assert Decimal(text) != 0 or text == "0"  # no "-0", no "0.00"


# --- billing periods and proration, by hand -----------------------------------------


def test_march_in_berlin_has_743_hours() -> None:
    p = period_containing("month", BERLIN, local_ms(BERLIN, 2026, 3, 15, 12))
    assert (p.start, p.end) == (utc_ms(2026, 2, 28, 23), utc_ms(2026, 3, 31, 22))
    assert p.end - p.start == 743 * HOUR


def test_subscription_starting_mid_march_in_berlin_is_prorated_on_milliseconds() -> None:
    plan = parse_plan({"code": "p", "currency": "EUR", "minimum": "100.00",
                       "charges": [{"type": "flat", "amount": "49.00"}]}, METERS)  # fmt: skip
    start = local_ms(BERLIN, 2026, 3, 15)  # 2026-03-14T23:00Z
    [part, april] = service_periods("month", BERLIN, start, None, local_ms(BERLIN, 2026, 4, 2))
    assert (part.start, part.end) == (utc_ms(2026, 3, 14, 23), utc_ms(2026, 3, 31, 22))
    # 17 local days, one of them 23 hours long (2026-03-29): 407 of 743 hours.
    assert (part.served_ms, part.period_ms) == (407 * HOUR, 743 * HOUR)
    p = price_period(plan, {}, part)
    # 49 x 407/743 = 26.8411.. -> 26.84; minimum 100 x 407/743 = 54.7779.. -> 54.78
    assert (p.lines[0].amount, p.minimum, p.minimum_adjustment, p.total) == (
        Decimal("26.84"),
        Decimal("54.78"),
        Decimal("27.94"),
        Decimal("54.78"),
    )
    assert not april.is_cut and price_period(plan, {}, april).lines[0].amount == Decimal("49.00")


def test_cancellation_just_after_the_spring_forward_counts_real_hours() -> None:
    plan = parse_plan({"code": "p", "currency": "EUR", "charges": [{"type": "flat", "amount": "49.00"}]}, METERS)
    # Clocks go 02:00 CET -> 03:00 CEST on 2026-03-29; 03:00 CEST is 01:00Z, 28 days and 2 hours in.
    at = local_ms(BERLIN, 2026, 3, 29, 3)
    [part] = service_periods("month", BERLIN, local_ms(BERLIN, 2026, 3, 1), at, at + DAY)
    assert part.served_ms == 674 * HOUR
    # 49 x 674/743 = 44.4495.. -> 44.45
    assert price_period(plan, {}, part).total == Decimal("44.45")


def test_plan_change_splits_the_period_between_the_plans() -> None:
    """The old plan bills up to the change, the new one from it: two parts that make up the whole month."""
    at = local_ms(BERLIN, 2026, 3, 29, 3)  # just after the spring-forward
    [old] = service_periods("month", BERLIN, local_ms(BERLIN, 2026, 1, 5), at, at + DAY)[-1:]
    [new] = service_periods("month", BERLIN, at, None, at + DAY)
    assert old.period == new.period and (old.end, new.start) == (at, at)
    assert old.served_ms + new.served_ms == old.period_ms == 743 * HOUR
    basic = parse_plan({"code": "basic", "currency": "EUR", "charges": [{"type": "flat", "amount": "49.00"}]}, METERS)
    pro = parse_plan({"code": "pro", "currency": "EUR", "charges": [{"type": "flat", "amount": "99.00"}]}, METERS)
    # 49 x 674/743 = 44.4495.. -> 44.45; 99 x 69/743 = 9.1938.. -> 9.19
    assert (price_period(basic, {}, old).total, price_period(pro, {}, new).total) == (Decimal("44.45"), Decimal("9.19"))
    doc = priced_period_json(price_period(pro, {}, new))
    assert doc["period"] == {"start": at, "end": new.period.end}
    assert doc["billing_period"] == {"start": local_ms(BERLIN, 2026, 3, 1), "end": local_ms(BERLIN, 2026, 4, 1)}


@pytest.mark.parametrize(("year", "days", "served_days", "expected"), [
    (2028, 29, 20, "33.79"),  # leap February: 49 x 20/29 = 33.7931..
    (2027, 28, 19, "33.25"),  # 49 x 19/28 = 33.25 exactly
])  # fmt: skip
def test_february_start_on_the_10th(year: int, days: int, served_days: int, expected: str) -> None:
    plan = parse_plan({"code": "p", "currency": "EUR", "charges": [{"type": "flat", "amount": "49.00"}]}, METERS)
    [part] = service_periods("month", BERLIN, local_ms(BERLIN, year, 2, 10), None, local_ms(BERLIN, year, 2, 20))
    assert (part.served_ms, part.period_ms) == (served_days * DAY, days * DAY)
    assert price_period(plan, {}, part).total == Decimal(expected)


@pytest.mark.parametrize(("cancel", "expected"), [
    ((2027, 2, 14, 12, 0, 0, 0), "23.63"),  # 49 x 13.5/28 = 23.625 exactly: half up
    ((2027, 2, 14, 11, 59, 59, 999), "23.62"),  # one millisecond less: 23.62499999..
])  # fmt: skip
def test_february_cancellation_to_the_millisecond(cancel: tuple[int, ...], expected: str) -> None:
    plan = parse_plan({"code": "p", "currency": "EUR", "charges": [{"type": "flat", "amount": "49.00"}]}, METERS)
    *wall, ms = cancel
    at = local_ms(BERLIN, *wall) + ms
    [part] = service_periods("month", BERLIN, local_ms(BERLIN, 2027, 2, 1), at, at)
    assert price_period(plan, {}, part).total == Decimal(expected)


def test_yearly_plan_starting_in_july_of_a_leap_year() -> None:
    plan = parse_plan({"code": "y", "currency": "USD", "interval": "year",
                       "charges": [{"type": "flat", "amount": "1200.00"}]}, METERS)  # fmt: skip
    tz = ZoneInfo("America/New_York")
    [part, next_year] = service_periods("year", tz, local_ms(tz, 2028, 7, 1), None, local_ms(tz, 2029, 3, 1))
    # 184 local days from July (EDT) to January (EST): the November fall-back adds an hour.
    assert (part.served_ms, part.period_ms) == (184 * DAY + HOUR, 366 * DAY)
    assert price_period(plan, {}, part).total == Decimal("603.42")  # 1200 x 4417/8784 = 603.4153..
    assert next_year.period == Period(local_ms(tz, 2029, 1, 1), local_ms(tz, 2030, 1, 1))


def test_periods_between_and_cut() -> None:
    tz = ZoneInfo("Asia/Kolkata")
    ps = periods_between("month", tz, local_ms(tz, 2026, 11, 30, 23), local_ms(tz, 2027, 1, 1))
    assert ps == [Period(local_ms(tz, 2026, 11, 1), local_ms(tz, 2026, 12, 1)),
                  Period(local_ms(tz, 2026, 12, 1), local_ms(tz, 2027, 1, 1))]  # fmt: skip
    assert periods_between("month", tz, 5, 5) == []
    assert cut(ps[0], ps[1].start, None) is None
    # A cancellation on a period boundary bills nothing of the next period.
    assert len(service_periods("month", tz, ps[0].start, ps[1].start, ps[1].start + DAY)) == 1


@settings(max_examples=60, deadline=None)
@given(tz=st.sampled_from(["UTC", "Europe/Berlin", "America/Santiago", "Australia/Lord_Howe", "Asia/Kolkata"]),
       start=st.integers(utc_ms(2020, 1, 1), utc_ms(2030, 1, 1)), months=st.integers(0, 30))  # fmt: skip
def test_month_periods_are_the_usage_month_windows(tz: str, start: int, months: int) -> None:
    """Billing periods and MONTH usage windows share their calendar: same boundaries."""
    zone = ZoneInfo(tz)
    end = start + months * 30 * DAY + 1
    ps = periods_between("month", zone, start, end)
    ws = spans("MONTH", zone, 0, start, end)
    assert [max(p.start, start) for p in ps] == [w.start for w in ws]
    assert [min(p.end, end) for p in ps] == [w.end for w in ws]
    assert all(a.end == b.start for a, b in itertools.pairwise(ps))


# --- Hypothesis: the engine against the reference -----------------------------------

CURRENCIES = ["EUR", "USD", "JPY", "KWD", "CHF"]


def _text(n: int, places: int) -> str:
    return format(Decimal(n).scaleb(-places), "f")


@st.composite
def decimals(draw: st.DrawFn, places: int, top: int) -> str:
    p = draw(st.integers(0, places))
    return _text(draw(st.integers(0, top * 10**p)), p)


def price_amounts() -> st.SearchStrategy[str]:
    return st.one_of(decimals(12, 2), decimals(4, 100), st.sampled_from(["0", "0.005", "0.5", "0.0005", "1"]))


@st.composite
def tiers(draw: st.DrawFn) -> list[dict[str, Any]]:
    bounds = sorted({Decimal(b) for b in draw(st.lists(decimals(9, 10_000), max_size=4))} - {Decimal(0)})
    out: list[dict[str, Any]] = []
    for b in [*bounds, None]:
        t: dict[str, Any] = {"unit_amount": draw(price_amounts())}
        if b is not None or draw(st.booleans()):
            t["up_to"] = None if b is None else decimal_text(Decimal(b))
        if draw(st.booleans()):
            t["flat_amount"] = draw(price_amounts())
        out.append(t)
    return out


@st.composite
def price_bodies(draw: st.DrawFn) -> dict[str, Any]:
    kind = draw(st.sampled_from(["unit", "graduated", "volume", "package"]))
    if kind == "unit":
        body = {"type": "unit", "unit_amount": draw(price_amounts())}
        if draw(st.booleans()):
            body["free_units"] = draw(decimals(9, 1000))
        return body
    if kind == "package":
        size = draw(decimals(9, 1000).filter(lambda s: Decimal(s) > 0))
        return {"type": "package", "package_size": size, "package_amount": draw(price_amounts())}
    return {"type": kind, "tiers": draw(tiers())}


@st.composite
def plans(draw: st.DrawFn) -> dict[str, Any]:
    currency = draw(st.sampled_from(CURRENCIES))
    places = MINOR[currency]
    charges: list[dict[str, Any]] = []
    for _ in range(draw(st.integers(1, 5))):
        kind = draw(st.sampled_from(["flat", "usage", "usage", "dimensional"]))
        if kind == "flat":
            charges.append({"type": "flat", "amount": draw(decimals(places, 1000))})
        elif kind == "usage":
            charges.append({**draw(price_bodies()), "meter": draw(st.sampled_from(["api_calls", "bandwidth"]))})
        else:
            values = draw(st.lists(st.sampled_from(["eu", "us", "ap", ""]), min_size=1, max_size=3, unique=True))
            c: dict[str, Any] = {"meter": "bandwidth", "price_by": "region",
                                 "prices": {v: draw(price_bodies()) for v in values}}  # fmt: skip
            if draw(st.booleans()):
                c["default"] = draw(price_bodies())
            charges.append(c)
    plan: dict[str, Any] = {"code": "p", "currency": currency, "charges": charges}
    if draw(st.booleans()):
        plan["minimum"] = draw(decimals(places, 5000))
    return plan


def _interesting_points(plan: dict[str, Any]) -> list[Decimal]:
    """Tier bounds, free units and package multiples, and their neighbours one unit of 1e-9 away."""
    points: set[Decimal] = {Decimal(0)}
    bodies = [c for c in plan["charges"] if c.get("type") != "flat"]
    bodies += [b for c in plan["charges"] for b in [*c.get("prices", {}).values(), c.get("default")] if b]
    for b in bodies:
        raw = [t.get("up_to") for t in b.get("tiers", [])] + [b.get("free_units"), b.get("package_size")]
        for r in raw:
            if r is not None:
                for k in (1, 2):
                    points |= {Decimal(r) * k, Decimal(r) * k + Decimal("1e-9"), Decimal(r) * k - Decimal("1e-9")}
    return sorted(p for p in points if p >= 0)


@st.composite
def quantities(draw: st.DrawFn, plan: dict[str, Any]) -> str:
    q = draw(st.one_of(st.sampled_from(_interesting_points(plan)).map(decimal_text), decimals(9, 50_000)))
    return "-" + q if draw(st.integers(0, 20)) == 0 else q


def _check_against_reference(plan_doc: dict[str, Any], usage_doc: dict[str, Any], part: ServicePeriod) -> None:
    plan = parse_plan(plan_doc, METERS)
    usage = {m: MeterUsage(Decimal(u["total"]), {p: {v: Decimal(q) for v, q in vs.items()} for p, vs in u["by"].items()})
             for m, u in usage_doc.items()}  # fmt: skip
    got = price_period(plan, usage, part)
    ref = reference_price(plan_doc, usage_doc, part.served_ms, part.period_ms)
    assert [(ln.charge, ln.meter, ln.dimension, Fraction(ln.quantity)) for ln in got.lines] == [
        (r.charge, r.meter, r.dimension, r.quantity) for r in ref["lines"]
    ]
    for ln, r in zip(got.lines, ref["lines"], strict=True):
        assert Fraction(ln.amount) == r.amount, (ln, r)
        if ln.tiers:  # the breakdown adds up to the exact amount the line rounds
            assert Fraction(sum((t.amount for t in ln.tiers), Decimal(0))) == r.exact
    assert Fraction(got.subtotal) == ref["subtotal"]
    assert Fraction(got.minimum) == ref["minimum"]
    assert Fraction(got.minimum_adjustment) == ref["adjustment"]
    assert Fraction(got.total) == ref["total"]
    assert got.total >= 0 and got.total >= got.minimum and got.total == got.subtotal + got.minimum_adjustment
    places = MINOR[plan.currency]
    doc = priced_period_json(got)
    assert all(len(line["amount"].partition(".")[2]) == places for line in doc["lines"])
    assert len(doc["total"].partition(".")[2]) == places


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_engine_equals_reference_on_random_plans(data: st.DataObject) -> None:
    plan_doc = data.draw(plans())
    regions = ["eu", "us", "ap", "", "sa"]
    by = {v: data.draw(quantities(plan_doc)) for v in data.draw(st.lists(st.sampled_from(regions), unique=True))}
    usage_doc = {
        "api_calls": {"total": data.draw(quantities(plan_doc)), "by": {}},
        "bandwidth": {"total": data.draw(quantities(plan_doc)), "by": {"region": by}},
    }
    period_ms = data.draw(st.sampled_from([28 * DAY, 743 * HOUR, 31 * DAY, 366 * DAY]))
    served = data.draw(st.one_of(st.just(period_ms), st.integers(1, period_ms)))
    offset = data.draw(st.integers(0, period_ms - served))
    part = ServicePeriod(Period(0, period_ms), offset, offset + served)
    _check_against_reference(plan_doc, usage_doc, part)


def _one(body: dict[str, Any], q: Decimal, currency: str = "KWD") -> tuple[Line, Decimal]:
    """The line of a one-charge plan and its exact amount (sum of its breakdown)."""
    plan = parse_plan({"code": "one", "currency": currency, "charges": [{**body, "meter": "bandwidth"}]}, METERS)
    line = price_period(plan, {"bandwidth": MeterUsage(q)}, FULL_MONTH).lines[0]
    return line, sum((t.amount for t in line.tiers), Decimal(0))


@settings(max_examples=150, deadline=None)
@given(data=st.data())
def test_graduated_and_volume_agree_where_the_definitions_say(data: st.DataObject) -> None:
    ts = data.draw(tiers())
    first = Decimal(ts[0]["up_to"]) if ts[0].get("up_to") else None
    q = Decimal(data.draw(quantities({"charges": [{"type": "graduated", "tiers": ts}]})).lstrip("-"))
    _, grad = _one({"type": "graduated", "tiers": ts}, q)
    _, vol = _one({"type": "volume", "tiers": ts}, q)
    if first is None or q <= first:  # one tier, or inside the first: the same units at the same price
        assert grad == vol
    if q == 0:
        assert grad == vol == 0
    # At a bound (up to and including): volume prices all units in that tier; graduated fills every tier up to it.
    for i, t in enumerate(ts[:-1]):
        b = Decimal(t["up_to"])
        lower = Decimal(ts[i - 1]["up_to"]) if i else Decimal(0)
        _, vol_b = _one({"type": "volume", "tiers": ts}, b)
        assert vol_b == b * Decimal(t["unit_amount"]) + Decimal(t.get("flat_amount", "0"))
        _, grad_b = _one({"type": "graduated", "tiers": ts}, b)
        _, grad_below = _one({"type": "graduated", "tiers": ts}, lower)
        assert grad_b == grad_below + (b - lower) * Decimal(t["unit_amount"]) + Decimal(t.get("flat_amount", "0"))


@settings(max_examples=100, deadline=None)
@given(unit=price_amounts(), free=decimals(9, 1000), q=decimals(9, 2000))
def test_free_units_are_free(unit: str, free: str, q: str) -> None:
    line, exact = _one({"type": "unit", "unit_amount": unit, "free_units": free}, Decimal(q))
    assert exact == max(Decimal(q) - Decimal(free), Decimal(0)) * Decimal(unit)
    if Decimal(free):  # the free part is its own row of the breakdown, priced at 0
        assert (line.tiers[0].quantity, line.tiers[0].amount) == (min(Decimal(q), Decimal(free)), Decimal(0))
    assert line.tiers[-1].quantity == max(Decimal(q) - Decimal(free), Decimal(0))


@settings(max_examples=100, deadline=None)
@given(size=decimals(9, 1000).filter(lambda s: Decimal(s) > 0), amount=price_amounts(), k=st.integers(0, 50))
def test_package_counts_started_blocks(size: str, amount: str, k: int) -> None:
    body = {"type": "package", "package_size": size, "package_amount": amount}
    s = Decimal(size)
    assert _one(body, s * k)[0].packages == k  # a full block does not start the next one
    assert _one(body, s * k + Decimal("1e-9"))[0].packages == k + 1
    line, _ = _one(body, s * k + Decimal("1e-9"), "EUR")
    assert line.amount == round_money((k + 1) * Decimal(amount), "EUR")


@settings(max_examples=200, deadline=None)
@given(unit=price_amounts(), q=decimals(9, 100_000), currency=st.sampled_from(CURRENCIES))
def test_line_amounts_round_half_up_once(unit: str, q: str, currency: str) -> None:
    line, exact = _one({"type": "unit", "unit_amount": unit}, Decimal(q), currency)
    places = MINOR[currency]
    assert Fraction(line.amount) == half_up(Fraction(exact), places)
    assert abs(Fraction(line.amount) - Fraction(exact)) <= Fraction(1, 2 * 10**places)


def test_plans_roundtrip_through_json() -> None:
    @settings(max_examples=100, deadline=None)
    @given(plans())
    def roundtrip(doc: dict[str, Any]) -> None:
        plan: Plan = parse_plan(doc, METERS)
        assert parse_plan(plan.as_json(), METERS) == plan

    roundtrip()


# --- fuzz: near-valid plans answer with a FieldError or a plan, never another exception ---

JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(max_size=12)
    | st.sampled_from(["0", "1", "-1", "1e3", "0.0000000000001", "EUR", "JPY", "api_calls", "region", "unit",
                       "graduated", "volume", "package", "flat", "month", "year", "99999999999999999999999999999"]),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=8,
)  # fmt: skip


def _paths(doc: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    out = [prefix] if prefix else []
    if isinstance(doc, dict):
        for k, v in doc.items():
            out += _paths(v, (*prefix, k))
    elif isinstance(doc, list):
        for i, v in enumerate(doc):
            out += _paths(v, (*prefix, i))
    return out


@settings(max_examples=300, deadline=None)
@given(data=st.data())
def test_mutated_plans_answer_with_a_field_error_or_a_plan(data: st.DataObject) -> None:
    doc = copy.deepcopy(ISSUE_PLAN)
    for _ in range(data.draw(st.integers(1, 3))):
        path = data.draw(st.sampled_from(_paths(doc)))
        _set(list(path), data.draw(JSON_VALUES | st.just(_DELETE)))(doc)
    try:
        plan = parse_plan(doc, METERS)
    except FieldError as e:
        assert e.field and e.message.endswith(".")
        return
    usage = {m: MeterUsage(Decimal(7), {p: {"eu-west-1": Decimal(3)} for p in props})
             for m, props in plan.usage_needs().items()}  # fmt: skip
    assert price_period(plan, usage, FULL_MONTH).total >= 0
    assert parse_plan(plan.as_json(), METERS) == plan
