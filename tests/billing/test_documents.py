"""Invoice documents: the HTML page and the PDF say the same things (one model), money and dates follow the
locale, and the PDF's text (pdftotext) holds the number, every line amount and the total."""

from __future__ import annotations

import asyncio
import subprocess
from collections.abc import Callable
from decimal import Decimal, localcontext
from pathlib import Path

import httpx
from babel.numbers import format_currency

from meterflow.billing.documents import DASH, Seller, build, render_html, render_pdf
from meterflow.billing.invoices import Invoices
from meterflow.billing.periods import ServicePeriod
from meterflow.billing.plans import parse_plan
from meterflow.billing.rating import MeterUsage, price_period
from meterflow.billing.render import priced_period_json
from meterflow.config import Settings
from meterflow.metering.meters import configured_meters
from meterflow.records import open_records
from meterflow.runtime import started
from tests.harness.backends import Backend
from tests.harness.invoice_samples import JAN_2026, draft, priced
from tests.harness.meterflow import MeterFlowServer
from tests.harness.processes import ROOT

OUTPUT = ROOT / "test-output"
SELLER = Seller("Acme Metering GmbH", ("Hauptstr. 1", "10115 Berlin"))


def invoice_json(status: str = "finalized", number: str | None = "MF-2026-000042") -> dict[str, object]:
    return {"id": "inv_" + "1" * 24, "number": number, "status": status, "customer_id": "cust_1",
            "subscription_id": "sub_1", **priced_period_json(priced()), "issued_at": 1_769_904_000_000,
            "due_at": 1_772_496_000_000}  # fmt: skip


def pdf_text(pdf: bytes, tmp_path: Path) -> str:
    path = tmp_path / "invoice.pdf"
    path.write_bytes(pdf)
    return subprocess.run(["pdftotext", "-layout", str(path), "-"], capture_output=True, text=True, check=True).stdout


def test_html_and_pdf_say_what_the_model_says(tmp_path: Path) -> None:
    doc = build(invoice_json(), {"name": "Globex & Co <EU>", "timezone": "UTC"}, SELLER,
                {"api_calls": "calls", "bandwidth": "bytes"}, "en_US")  # fmt: skip
    page = render_html(doc)
    text = pdf_text(render_pdf(doc), tmp_path)
    assert "Globex &amp; Co &lt;EU&gt;" in page and "Globex & Co <EU>" in text  # escaped in HTML, literal in Typst
    cells = [c for r in doc.rows for c in r.cells if c] + [v for kv in doc.totals for v in kv] + [doc.title]
    for cell in cells:
        assert cell.replace("&", "&amp;") in page, cell
        assert cell in text, cell
    assert f"Tier 0 {DASH} 1,000,000,000" in text and "312,500 calls" in text
    assert f"Jan 1, 2026 {DASH} Jan 31, 2026" in text


def test_money_and_dates_follow_the_locale() -> None:
    doc = build(invoice_json(), None, SELLER, {}, "de_DE")
    assert ("Total (EUR)", "200,00\xa0€") in doc.totals
    assert any(v == f"01.01.2026 {DASH} 31.01.2026" for _, v in doc.facts)
    drafted = build(invoice_json(status="draft", number=None), None, SELLER, {}, "en_US")
    assert drafted.title == "Draft invoice" and drafted.stamp == "DRAFT"
    # A finalized document never changes, so no status that comes later (paid, void) is printed on it.
    for status in ("finalized", "paid", "void"):
        assert build(invoice_json(status=status), None, SELLER, {}, "en_US").stamp is None


# Numbers as wide as the plan rules allow: Decimal128(38, 9) quantities and tier bounds (29 + 9 digits),
# prices of 15 + 12 digits; the exact amount of a tier then has 43 + 21 here.
BOUND = "12345678901234567890123456789.123456789"
USAGE = "98765432109876543210987654321.987654321"
PRICE = "123456789012345.123456789012"
FLAT = "999999999999999.999999999999"
WIDE_PLAN = {"code": "wide", "currency": "EUR", "charges": [
    {"type": "graduated", "meter": "api_calls", "tiers": [{"up_to": BOUND, "unit_amount": PRICE, "flat_amount": FLAT},
                                                           {"up_to": None, "unit_amount": "0.000000000001"}]},
    {"type": "unit", "meter": "bandwidth", "unit_amount": PRICE}]}  # fmt: skip


def grouped(x: str) -> str:
    """en_US digit grouping, by Python's own Decimal formatting (exact, no context): the oracle, not Babel."""
    return f"{Decimal(x):,f}"


def test_every_digit_the_plan_rules_allow_is_shown(tmp_path: Path) -> None:
    """D10: 38 significant digits (quantities, tier bounds), 27-digit prices and the amounts they make."""
    meters = {m.code: m for m in configured_meters(Settings())}
    usage = {"api_calls": MeterUsage(Decimal(USAGE)), "bandwidth": MeterUsage(Decimal(USAGE))}
    p = price_period(parse_plan(WIDE_PLAN, meters), usage, ServicePeriod(JAN_2026, JAN_2026.start, JAN_2026.end))
    invoice = {**invoice_json(), **priced_period_json(p)}
    tiered, unit = invoice["lines"]
    doc = build(invoice, None, SELLER, {"api_calls": "calls"}, "en_US")
    expected = [
        f"{grouped(USAGE)} calls",  # the line's quantity: 38 digits
        f"Tier 0 {DASH} {grouped(BOUND)}", f"Tier over {grouped(BOUND)}",  # tier bounds: 38 digits
        f"€{grouped(PRICE)} + €{grouped(FLAT)}",  # a 27-digit price and flat amount
        *(f"€{grouped(t['amount'])}" for t in tiered["tiers"]),  # exact tier amounts: 64 digits
        f"€{grouped(tiered['amount'])}", f"€{grouped(unit['amount'])}", f"€{grouped(invoice['total'])}",
    ]  # fmt: skip
    assert len(Decimal(tiered["tiers"][0]["amount"]).as_tuple().digits) == 64  # 43 + 21
    cells = {c for r in doc.rows for c in r.cells} | {v for _, v in doc.totals}
    page = render_html(doc)
    text = pdf_text(render_pdf(doc), tmp_path)
    for x in expected:
        assert any(x in c for c in cells), x
        assert x in page, x
        assert x in text, x
    with localcontext() as ctx:  # whatever context the caller is in
        ctx.prec = 5
        assert build(invoice, None, SELLER, {"api_calls": "calls"}, "en_US") == doc
    de = build(invoice, None, SELLER, {}, "de_DE")
    assert any(v == f"{grouped(invoice['total']).translate(str.maketrans(',.', '.,'))}\xa0€" for _, v in de.totals)


def test_pdf_over_http_holds_number_amounts_and_total(
    make_backend: Callable[[str], Backend], start_server: Callable[..., MeterFlowServer], tmp_path: Path
) -> None:
    backend = make_backend("embedded")
    server = start_server(backend, MF_INVOICE_SELLER_NAME="Acme Metering GmbH",
                          MF_INVOICE_SELLER_ADDRESS="Hauptstr. 1|10115 Berlin")  # fmt: skip

    async def make() -> str:
        records = open_records(Settings(data_dir=backend.env["MF_DATA_DIR"]))
        async with started(records):
            return str((await draft(Invoices(records, None)))["id"])

    iid = asyncio.run(make())
    with httpx.Client(base_url=server.url, headers=server.auth, timeout=60) as c:
        assert c.put("/v1/customers/cust_1", json={"name": "Globex Corporation"}).status_code == 201
        invoice = c.post(f"/v1/invoices/{iid}/finalize").json()
        r = c.get(f"/v1/invoices/{iid}.pdf")
        assert r.status_code == 200 and r.headers["content-type"] == "application/pdf" and r.content[:5] == b"%PDF-"
        page = c.get(f"/v1/invoices/{iid}.html")
        assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
        assert c.get("/v1/invoices/inv_" + "0" * 24 + ".pdf").status_code == 404
    text = pdf_text(r.content, tmp_path)
    money = [format_currency(ln["amount"], "EUR", locale="en_US") for ln in invoice["lines"]]
    total = format_currency(invoice["total"], "EUR", locale="en_US")
    for expected in (invoice["number"], *money, total, "Globex Corporation", "Acme Metering GmbH", "10115 Berlin"):
        assert expected in text, expected
        assert expected in page.text, expected
    OUTPUT.mkdir(exist_ok=True)
    (OUTPUT / "invoice.pdf").write_bytes(r.content)
    subprocess.run(["pdftoppm", "-png", "-r", "80", "-f", "1", "-l", "1", "-singlefile", str(OUTPUT / "invoice.pdf"),
                    str(OUTPUT / "invoice-page1")], check=True)  # fmt: skip
    png = OUTPUT / "invoice-page1.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    print(f"first page of the invoice PDF: {png}")
