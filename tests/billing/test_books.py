"""The books after the fact (issue 21's D1-D12): each history played on both backend pairs, on a moved clock.

Expected amounts are worked out by hand in the comments from the README's rules
("Pricing" and "The books after the fact"), not from the code.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from decimal import Decimal
from fractions import Fraction
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from meterflow.billing.closing import Closer
from meterflow.billing.failures import ClosingFailures
from meterflow.billing.subscriptions import SubscriptionConflict
from meterflow.kernel.rust import decode_batch
from meterflow.metering.meters import configured_meters, parse_meter
from meterflow.records.tables import meter_versions, meters
from meterflow.storage.embedded import EmbeddedStorage
from tests.billing.books import DAY, HOUR, LIMITS, Books, call, open_books, utc
from tests.harness.pricing_reference import half_up

JAN, FEB, MAR, APR = utc(2026, 1, 1), utc(2026, 2, 1), utc(2026, 3, 1), utc(2026, 4, 1)
PRO = {"code": "pro", "currency": "EUR", "interval": "month", "charges": [
    {"type": "flat", "amount": "30.00", "description": "Platform"},
    {"type": "unit", "meter": "api_calls", "unit_amount": "0.50"},
    # The same meter and type again: a second line key, never merged with the first (D1).
    {"type": "unit", "meter": "api_calls", "unit_amount": "0.05", "description": "Support surcharge"},
    {"type": "unit", "meter": "bandwidth", "unit_amount": "0.001"},
]}  # fmt: skip
LITE = {"code": "lite", "currency": "EUR", "interval": "month", "charges": [
    {"type": "flat", "amount": "10.00"}, {"type": "unit", "meter": "api_calls", "unit_amount": "0.20"}]}  # fmt: skip


@pytest.fixture(params=["embedded", "full"])
async def books(request: pytest.FixtureRequest, chdb_storage: EmbeddedStorage, tmp_path: Path) -> AsyncIterator[Books]:
    async for b in open_books(request.param, request, chdb_storage, tmp_path, JAN):
        await b.plan(PRO)
        await b.plan(LITE)
        yield b


def late_lines(inv: dict[str, Any]) -> list[tuple[str, str]]:
    return [(ln["line_key"], ln["amount"]) for ln in inv["lines"] if "late_for" in ln]


def credits(note: dict[str, Any]) -> list[tuple[str, str]]:
    return [(ln["line_key"], ln["amount"]) for ln in note["lines"]]


async def jan_invoiced(b: Books, cid: str = "c1", calls: int = 10) -> dict[str, Any]:
    """Customer `cid` on pro from January 1st with `calls` calls of 100 bytes on the 10th, January closed."""
    await b.customer(cid)
    await b.subscriptions.create(cid, "pro", JAN)
    b.clock.set(utc(2026, 1, 20))
    await b.ingest([call(f"{cid}_jan{i}", cid, utc(2026, 1, 10) + i) for i in range(calls)])
    await b.close(FEB + 2 * HOUR)
    [jan] = await b.invoices_of(cid)
    assert jan["status"] == "finalized"
    return jan


async def test_two_charges_of_one_meter_and_type_are_two_lines_and_no_late_line_is_invented(books: Books) -> None:
    """D1."""
    jan = await jan_invoiced(books)
    # 30 + 10 x 0.50 + 10 x 0.05 + 1000 x 0.001
    assert jan["total"] == "36.50"
    assert [ln["line_key"] for ln in jan["lines"]] == ["0", "1", "2", "3"]
    await books.close(MAR + 2 * HOUR)
    feb = (await books.invoices_of("c1"))[1]
    assert (feb["total"], late_lines(feb)) == ("30.00", [])
    books.clock.set(MAR + 3 * HOUR)
    await books.ingest([call("c1_late", "c1", utc(2026, 1, 25))])
    await books.close(APR + 2 * HOUR)
    mar = (await books.invoices_of("c1"))[2]
    assert late_lines(mar) == [("1", "0.50"), ("2", "0.05"), ("3", "0.10")]
    assert mar["total"] == "30.65"
    await books.close(APR + 3 * HOUR)
    assert len(await books.invoices_of("c1")) == 3 and await books.notes_of("c1") == []


async def test_a_time_zone_change_keeps_invoiced_periods_and_starts_at_the_next_boundary(books: Books) -> None:
    """D2: never a second invoice over the same time."""
    await jan_invoiced(books)
    books.clock.set(utc(2026, 2, 10))
    await books.customers.patch("c1", {"timezone": "Europe/Berlin"})
    await books.close(MAR + 2 * HOUR)
    await books.close(APR + 2 * HOUR)
    periods = [(i["period"]["start"], i["period"]["end"]) for i in await books.invoices_of("c1")]
    # February began in UTC and keeps its bounds; March runs to the end of Berlin's March (CEST, UTC+2).
    assert periods == [(JAN, FEB), (FEB, MAR), (MAR, utc(2026, 3, 31, 22))]
    march = (await books.invoices_of("c1"))[2]
    assert march["lines"][0]["amount"] == "30.00"  # a whole period: the flat fee is not prorated
    await books.close(utc(2026, 4, 30, 22) + 2 * HOUR)
    assert (await books.invoices_of("c1"))[3]["period"] == {"start": utc(2026, 3, 31, 22), "end": utc(2026, 4, 30, 22)}
    assert await books.notes_of("c1") == []


async def _mid_january_history(b: Books) -> dict[str, Any]:
    await b.customer("c1")
    sub = await b.subscriptions.create("c1", "pro", JAN)
    b.clock.set(utc(2026, 1, 25))
    await b.ingest([call(f"early{i}", "c1", utc(2026, 1, 10) + i) for i in range(5)]
                   + [call(f"late{i}", "c1", utc(2026, 1, 20) + i) for i in range(3)])  # fmt: skip
    await b.close(FEB + 2 * HOUR)
    [jan] = await b.invoices_of("c1")
    assert jan["total"] == "35.20"  # 30 + 8 x 0.50 + 8 x 0.05 + 800 x 0.001
    b.clock.set(FEB + 5 * DAY)
    return {"sub": sub, "jan": jan}


# Pro owes for January 1-16 only: 30 x 15/31 = 14.516... -> 14.52, and the 5 calls before the 16th:
# 2.50 + 0.25 + 0.50. Credited: 30 - 14.52 = 15.48, 1.50, 0.15 and 0.30.
MID_JANUARY_CREDITS = [("0", "15.48"), ("1", "1.50"), ("2", "0.15"), ("3", "0.30")]


async def test_a_change_dated_in_a_finalized_period_credits_the_old_plan_and_invoices_the_new_from_then(
    books: Books,
) -> None:
    """D3."""
    h = await _mid_january_history(books)
    ended, new = await books.subscriptions.change(h["sub"].id, "lite", utc(2026, 1, 16))  # type: ignore[misc]
    await books.close(books.clock.now_ms() + HOUR)
    [note] = await books.notes_of("c1")
    assert (note["invoice_id"], note["reason"], note["total"]) == (h["jan"]["id"], "retroactive_change", "17.43")
    assert credits(note) == MID_JANUARY_CREDITS
    lite = [i for i in await books.invoices_of("c1") if i["subscription_id"] == new.id]
    # Lite from January 16th: 10 x 16/31 = 5.161... -> 5.16, and the 3 calls after it at 0.20.
    assert [(i["period"], i["total"]) for i in lite] == [({"start": utc(2026, 1, 16), "end": FEB}, "5.76")]
    assert (await books.subscriptions.get(ended.id)).settle_from is None  # type: ignore[union-attr]
    await books.close(books.clock.now_ms() + 2 * HOUR)  # settled once
    assert len(await books.notes_of("c1")) == 1 and len(await books.invoices_of("c1")) == 2


async def test_a_cancel_dated_in_a_finalized_period_credits_what_is_no_longer_owed(books: Books) -> None:
    """D4."""
    h = await _mid_january_history(books)
    await books.subscriptions.cancel(h["sub"].id, utc(2026, 1, 16))
    await books.close(books.clock.now_ms() + HOUR)
    [note] = await books.notes_of("c1")
    assert credits(note) == MID_JANUARY_CREDITS and note["reason"] == "retroactive_change"
    [jan] = await books.invoices_of("c1")
    assert (jan["total"], jan["amount_credited"], jan["amount_due"]) == ("35.20", "17.43", "17.77")
    await books.close(APR)
    assert len(await books.invoices_of("c1")) == 1  # nothing after the cancel


async def test_late_usage_of_a_cancelled_subscription_gets_an_invoice_of_late_lines_only(books: Books) -> None:
    """D7, when the customer has nothing else to invoice."""
    await books.customer("c1")
    sub = await books.subscriptions.create("c1", "pro", JAN)
    await books.subscriptions.cancel(sub.id, FEB)
    books.clock.set(utc(2026, 1, 20))
    await books.ingest([call(f"j{i}", "c1", utc(2026, 1, 10) + i) for i in range(10)])
    await books.close(FEB + 2 * HOUR)
    books.clock.set(utc(2026, 2, 10))
    await books.ingest([call("late", "c1", utc(2026, 1, 25))])
    report = await books.close(utc(2026, 2, 10) + HOUR)
    assert report.late_invoices == 1
    _, late = await books.invoices_of("c1")
    assert (late["kind"], late["status"], late["total"]) == ("late", "finalized", "0.65")
    assert late_lines(late) == [("1", "0.50"), ("2", "0.05"), ("3", "0.10")]
    assert all(ln["late_for"] == {"subscription_id": sub.id, "start": JAN, "end": FEB} for ln in late["lines"])
    await books.close(utc(2026, 3, 10))
    assert len(await books.invoices_of("c1")) == 2


async def test_late_usage_of_a_changed_subscription_goes_on_the_customers_next_invoice(books: Books) -> None:
    """D7, when another subscription of the customer takes it."""
    await books.customer("c1")
    sub = await books.subscriptions.create("c1", "pro", JAN)
    books.clock.set(utc(2026, 1, 20))
    ended, new = await books.subscriptions.change(sub.id, "lite", FEB)  # type: ignore[misc]
    await books.ingest([call(f"j{i}", "c1", utc(2026, 1, 10) + i) for i in range(10)])
    await books.close(FEB + 2 * HOUR)
    books.clock.set(utc(2026, 2, 10))
    await books.ingest([call("late", "c1", utc(2026, 1, 25))])
    report = await books.close(utc(2026, 2, 10) + HOUR)
    assert report.late_invoices == 0  # lite takes it on its next invoice
    pending = await Closer(books).late_lines(new, "EUR", books.clock.now_ms())
    assert [(ln["line_key"], ln["amount"]) for ln in pending] == [("1", "0.50"), ("2", "0.05"), ("3", "0.10")]
    await books.close(MAR + 2 * HOUR)
    feb = next(i for i in await books.invoices_of("c1") if i["subscription_id"] == new.id)
    assert late_lines(feb) == [("1", "0.50"), ("2", "0.05"), ("3", "0.10")]
    assert feb["total"] == "10.65" and {ln["late_for"]["subscription_id"] for ln in feb["lines"][2:]} == {ended.id}


async def test_a_late_decrease_is_a_credit_note_and_no_total_goes_negative(books: Books) -> None:
    """D8: a late event of -600 bytes (and one more call)."""
    await jan_invoiced(books)
    books.clock.set(utc(2026, 2, 10))
    await books.ingest([call("refund", "c1", utc(2026, 1, 25), -600)])
    await books.close(utc(2026, 2, 10) + HOUR)
    [note] = await books.notes_of("c1")
    assert (note["reason"], credits(note)) == ("late_correction", [("3", "0.60")])  # 1000 -> 400 bytes
    await books.close(MAR + 2 * HOUR)
    feb = (await books.invoices_of("c1"))[1]
    assert late_lines(feb) == [("1", "0.50"), ("2", "0.05")] and feb["total"] == "30.55"
    for inv in await books.invoices_of("c1"):
        assert Decimal(inv["total"]) >= 0 and all(Decimal(ln["amount"]) >= 0 for ln in inv["lines"])


async def test_the_cut_last_period_is_invoiced_at_the_subscriptions_end(books: Books) -> None:
    """D9."""
    await books.customer("c1")
    sub = await books.subscriptions.create("c1", "pro", JAN)
    books.clock.set(utc(2026, 1, 10))
    await books.subscriptions.cancel(sub.id, utc(2026, 1, 20))
    await books.close(utc(2026, 1, 20) + 2 * HOUR)
    [jan] = await books.invoices_of("c1")
    assert jan["status"] == "finalized" and jan["period"] == {"start": JAN, "end": utc(2026, 1, 20)}
    assert jan["lines"][0]["amount"] == "18.39"  # 30 x 19/31 = 18.387...


async def test_late_differences_of_38_digit_amounts_are_exact(books: Books) -> None:
    """D11: quantities of 32 significant digits, whose differences the default 28-digit context rounds."""
    await books.plan({"code": "big", "currency": "EUR", "charges": [
        {"type": "unit", "meter": "bandwidth", "unit_amount": "1.000000000001"}]})  # fmt: skip
    await books.customer("c1")
    await books.subscriptions.create("c1", "big", JAN)
    first, second = "12345678901234567890123.123456789", "98765432109876543210987.987654321"

    async def ingest(tid: str, nbytes: str) -> None:
        # A JSON number of 32 digits (a float would lose them): the body is written out by hand.
        body = (f'{{"events":[{{"transaction_id":"{tid}","customer_id":"c1","event_type":"api_request",'
                f'"timestamp":{utc(2026, 1, 10)},"properties":{{"bytes":{nbytes}}}}}]}}').encode()  # fmt: skip
        b = decode_batch(body, books.clock.now_ms(), LIMITS)
        assert not b.failed, b.failed
        await books.storage.insert_events(b.storage_rows())

    books.clock.set(utc(2026, 1, 20))
    await ingest("a", first)
    await books.close(FEB + 2 * HOUR)
    books.clock.set(FEB + 3 * HOUR)
    await ingest("b", second)
    await books.close(MAR + 2 * HOUR)
    price = Fraction("1.000000000001")
    expected = half_up((Fraction(first) + Fraction(second)) * price, 2) - half_up(Fraction(first) * price, 2)
    feb = (await books.invoices_of("c1"))[1]
    [line] = [ln for ln in feb["lines"] if "late_for" in ln]
    assert (line["line_key"], line["quantity"]) == ("0", second)
    assert Fraction(line["amount"]) == expected


async def test_concurrent_cancels_and_changes_leave_one_winner_and_no_gap(books: Books) -> None:
    """D12: 10 cancels and 10 changes at once on one subscription."""
    await books.customer("c1")
    sub = await books.subscriptions.create("c1", "pro", JAN)
    books.clock.set(utc(2026, 1, 20))

    async def one(i: int) -> str:
        try:
            if i % 2:
                await books.subscriptions.cancel(sub.id, utc(2026, 1, 20) + i * HOUR)
            else:
                await books.subscriptions.change(sub.id, "lite", utc(2026, 1, 20) + i * HOUR)
        except SubscriptionConflict as e:
            return e.code
        return "ok"

    outcomes = await asyncio.gather(*(one(i) for i in range(20)))
    assert outcomes.count("ok") == 1 and set(outcomes) == {"ok", "subscription_ended"}
    subs = await books.subscriptions.of_customer("c1")
    ended = next(s for s in subs if s.id == sub.id)
    assert ended.end is not None
    others = [s for s in subs if s.id != sub.id]
    if ended.end_reason == "changed":
        [new] = others
        assert new.start == ended.end and new.end is None  # no gap, no overlap
    else:
        assert others == []


async def test_a_subscription_that_cannot_be_priced_never_stops_the_others(books: Books) -> None:
    """D5: a plan whose meter is gone (removed behind the API's back) fails alone, is listed, and retried."""
    await books.meters.create(parse_meter({"code": "seats", "event_type": "seat", "aggregation": "COUNT"}))
    await books.plan({"code": "seated", "currency": "EUR", "charges": [
        {"type": "flat", "amount": "5.00"}, {"type": "unit", "meter": "seats", "unit_amount": "1"}]})  # fmt: skip
    await books.customer("c1")
    await books.customer("c2")
    await books.subscriptions.create("c1", "pro", JAN)
    broken = await books.subscriptions.create("c2", "seated", JAN)
    async with books.records.begin() as conn:
        await conn.execute(sa.delete(meter_versions).where(meter_versions.c.code == "seats"))
        await conn.execute(sa.delete(meters).where(meters.c.code == "seats"))
    report = await books.close(FEB + 2 * HOUR)
    assert (report.closed, report.failed) == (1, 1)
    assert [i["status"] for i in await books.invoices_of("c1")] == ["finalized"]
    failures = ClosingFailures(books.records)
    [f] = await failures.list()
    assert (f["subscription_id"], f["attempts"]) == (broken.id, 1) and "seats" in f["error"]
    await books.close(FEB + 3 * HOUR)
    assert (await failures.list())[0]["attempts"] == 2
    await books.meters.create(parse_meter({"code": "seats", "event_type": "seat", "aggregation": "COUNT"}))
    report = await books.close(FEB + 4 * HOUR)
    assert report.closed == 1 and await failures.list() == []
    assert [i["total"] for i in await books.invoices_of("c2")] == ["5.00"]


async def test_a_void_invoice_takes_no_credit_note_and_a_removed_periods_draft_is_discarded(books: Books) -> None:
    """Voiding is a decision about collecting: settling credits nothing on a void invoice (and does not fail)."""
    await books.customer("c1")
    sub = await books.subscriptions.create("c1", "pro", JAN)
    await books.close(FEB + 2 * HOUR)
    [jan] = await books.invoices_of("c1")
    await books.invoices.transition(jan["id"], "void")
    await books.close(MAR + 10 * 60_000)  # February's draft, still in its grace
    assert [i["status"] for i in await books.invoices_of("c1")] == ["void", "draft"]
    books.clock.set(MAR + 20 * 60_000)
    await books.subscriptions.cancel(sub.id, utc(2026, 1, 16))
    report = await books.close(MAR + 30 * 60_000)
    assert (report.failed, report.credit_notes) == (0, 0)
    assert [i["status"] for i in await books.invoices_of("c1")] == ["void"]  # February is no longer billed
    assert await ClosingFailures(books.records).list() == []


async def test_between_full_settlements_only_changes_dated_in_the_past_are_settled(books: Books) -> None:
    """MF_INVOICE_SETTLE_INTERVAL_S: one closer settles every customer once per interval."""
    await jan_invoiced(books, "c1")
    await jan_invoiced(books, "c2")
    closer = Closer(books)
    await closer.run(FEB + 3 * HOUR)  # the first pass of a closer settles everyone
    books.clock.set(FEB + 3 * HOUR + 60_000)
    await books.ingest([call("refund", "c1", utc(2026, 1, 25), -600)])
    c2 = (await books.subscriptions.of_customer("c2"))[0]
    await books.subscriptions.cancel(c2.id, utc(2026, 1, 16))
    report = await closer.run(FEB + 3 * HOUR + 120_000)
    assert report.credit_notes == 1 and await books.notes_of("c1") == []  # c2's cancel only
    report = await closer.run(FEB + 3 * HOUR + books.settings.invoice_settle_interval_s * 1000)
    assert report.credit_notes == 1 and [credits(n) for n in await books.notes_of("c1")] == [[("3", "0.60")]]


def test_lines_stored_before_line_keys_get_theirs_from_the_plan_version() -> None:
    from meterflow.billing.closing import legacy_keys
    from meterflow.billing.plans import parse_plan
    from meterflow.config import Settings

    plan = parse_plan({**PRO, "charges": [*PRO["charges"], {"meter": "api_calls", "price_by": "region", "prices": {
        "eu": {"type": "unit", "unit_amount": "1"}, "us": {"type": "unit", "unit_amount": "2"}}}]},
        {m.code: m for m in configured_meters(Settings())})  # fmt: skip
    lines: list[dict[str, Any]] = [
        {"charge": "flat", "meter": None}, {"charge": "unit", "meter": "api_calls"},
        {"charge": "unit", "meter": "api_calls"}, {"charge": "unit", "meter": "bandwidth"},
        {"charge": "unit", "meter": "api_calls", "dimension": {"region": "eu"}},
        {"charge": "unit", "meter": "api_calls", "dimension": {"region": "us"}},
        {"charge": "unit", "meter": "bandwidth", "late_for": {}},
        {"charge": "unit", "meter": "api_calls", "dimension": {"region": "us"}, "late_for": {}},
    ]  # fmt: skip
    assert legacy_keys(plan, lines) == ["0", "1", "2", "3", "4:region=eu", "4:region=us", "3", "4:region=us"]


async def test_a_pass_at_an_earlier_instant_credits_nothing_of_later_periods(books: Books) -> None:
    """`meterflow invoices close --at <past>`: periods invoiced after `at` are still owed."""
    await books.customer("c1")
    await books.subscriptions.create("c1", "pro", JAN)
    for at in (FEB, MAR, APR):
        await books.close(at + 2 * HOUR)
    books.clock.set(APR + 3 * HOUR)
    report = await Closer(books).run(FEB + 3 * HOUR)
    assert report.credit_notes == 0 and await books.notes_of("c1") == []
    assert [i["status"] for i in await books.invoices_of("c1")] == ["finalized"] * 3


async def test_whatever_one_subscription_raises_the_pass_closes_the_others_and_records_it(
    books: Books, monkeypatch: pytest.MonkeyPatch
) -> None:
    import meterflow.billing.closing as closing

    await books.customer("c1")
    await books.customer("c2")
    bad = await books.subscriptions.create("c1", "pro", JAN)
    await books.subscriptions.create("c2", "pro", JAN)
    real = closing.price_service_period

    async def price(deps: Any, ctx: Any, period: Any) -> Any:
        if ctx.subscription.id == bad.id:
            raise RuntimeError("something no one foresaw")
        return await real(deps, ctx, period)

    monkeypatch.setattr(closing, "price_service_period", price)
    report = await books.close(FEB + 2 * HOUR)
    assert (report.closed, report.failed) == (1, 1)
    [f] = await ClosingFailures(books.records).list()
    assert f["subscription_id"] == bad.id and "no one foresaw" in f["error"]
    assert [i["status"] for i in await books.invoices_of("c2")] == ["finalized"]


async def test_a_change_made_while_a_pass_runs_is_not_invoiced_over(books: Books) -> None:
    """The period listed as due before the change is not closed with the subscription as it was."""
    h = await _mid_january_history(books)
    books.clock.set(MAR + 2 * HOUR)
    closer = Closer(books)
    [due] = await closer.due(MAR + 2 * HOUR)  # February, of pro
    await books.subscriptions.change(h["sub"].id, "lite", utc(2026, 1, 16))
    assert await closer.close(due) == "skipped"
    await books.close(MAR + 3 * HOUR)
    pro = [i for i in await books.invoices_of("c1") if i["subscription_id"] == h["sub"].id]
    assert [i["period"]["start"] for i in pro] == [JAN]  # no February for the plan that ended on the 16th
    [note] = await books.notes_of("c1")
    assert note["reason"] == "retroactive_change" and credits(note) == MID_JANUARY_CREDITS


async def test_finalizing_a_draft_early_prices_it_again(books: Books) -> None:
    await books.customer("c1")
    await books.subscriptions.create("c1", "pro", JAN)
    await books.close(FEB + 10 * 60_000)  # in its grace: a draft
    [draft] = await books.invoices_of("c1")
    assert (draft["status"], draft["total"]) == ("draft", "30.00")
    books.clock.set(FEB + 20 * 60_000)
    await books.ingest([call("in_grace", "c1", utc(2026, 1, 31))])
    done = await Closer(books).finalize(draft["id"])
    assert done is not None and (done["status"], done["total"]) == ("finalized", "30.65")
