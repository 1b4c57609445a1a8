"""Frozen documents: a finalized invoice's (and a credit note's) HTML and PDF are rendered once, from the
snapshot taken at finalization, and served byte for byte ever after with their SHA-256 as ETag, whatever
happens to the customer, the seller settings or a meter; on SQLite and PostgreSQL, and over HTTP."""

from __future__ import annotations

import asyncio
import hashlib
import secrets
import subprocess
import threading
from collections.abc import Callable, Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import pytest
import sqlalchemy as sa

from meterflow.billing import rendered
from meterflow.billing.documents import Seller, build, build_credit_note, build_frozen, render_html, render_pdf
from meterflow.billing.invoices import Invoices
from meterflow.billing.periods import ServicePeriod
from meterflow.billing.plans import parse_plan
from meterflow.billing.rating import MeterUsage, price_period
from meterflow.billing.render import priced_period_json
from meterflow.billing.rendered import credit_note_bytes, frozen, invoice_bytes
from meterflow.billing.snapshot import take_snapshot
from meterflow.config import Settings
from meterflow.customers import Customers, validate
from meterflow.metering.catalog import MeterCatalog
from meterflow.metering.meters import configured_meters, parse_meter
from meterflow.records import Records, open_records
from meterflow.records.tables import credit_notes, rendered_documents
from meterflow.runtime import open_invoices, started
from tests.harness.backends import Backend
from tests.harness.invoice_samples import JAN_2026, PLAN, draft
from tests.harness.meterflow import MeterFlowServer

SELLER = {"invoice_seller_name": "Acme Metering GmbH", "invoice_seller_address": "Hauptstr. 1 | 10115 Berlin"}
BEFORE = {"name": "Globex Corporation", "email": "billing@globex.example", "timezone": "UTC"}
# Kiritimati is UTC+14: every date of a January invoice in UTC would read a day later there.
AFTER = {"name": "Initech LLC", "email": "ap@initech.example", "timezone": "Pacific/Kiritimati"}
API_CALLS = {"event_type": "api_request", "aggregation": "COUNT", "unit": "calls"}
BANDWIDTH = {"event_type": "api_request", "aggregation": "SUM", "property": "bytes", "unit": "bytes"}


def pdf_text(pdf: bytes, tmp_path: Path) -> str:
    path = tmp_path / f"{secrets.token_hex(4)}.pdf"
    path.write_bytes(pdf)
    return subprocess.run(["pdftotext", "-layout", str(path), "-"], capture_output=True, text=True, check=True).stdout


@pytest.fixture
def renders(monkeypatch: pytest.MonkeyPatch) -> Iterator[dict[str, int]]:
    """How many times billing/rendered.py typeset a PDF or wrote an HTML page."""
    counts = {"html": 0, "pdf": 0}

    def counting(fmt: str, real: Callable[[Any], Any]) -> Callable[[Any], Any]:
        def render(doc: Any) -> Any:
            counts[fmt] += 1
            return real(doc)

        return render

    monkeypatch.setattr(rendered, "render_html", counting("html", render_html))
    monkeypatch.setattr(rendered, "render_pdf", counting("pdf", render_pdf))
    yield counts


class Books:
    """A customer, two API meters and an invoice store that freezes a snapshot into each invoice it
    finalizes, wired as the server wires it (runtime.open_invoices)."""

    def __init__(self, records: Records) -> None:
        self.records = records
        self.customers = Customers(records)
        self.meters = MeterCatalog(records, ())

    async def finalized(self, settings: Settings) -> dict[str, Any]:
        await self.customers.put("cust_1", validate(BEFORE))
        for code, doc in (("api_calls", API_CALLS), ("bandwidth", BANDWIDTH)):
            await self.meters.create(parse_meter({"code": code, **doc}))
        self.invoices = open_invoices(settings, self.records, None, self.customers, self.meters)
        d = await draft(self.invoices)
        assert "snapshot" not in d  # a draft renders live
        invoice = await self.invoices.transition(d["id"], "finalize")
        assert invoice is not None and invoice == await self.invoices.get(d["id"])
        return invoice

    async def edit_everything(self) -> None:
        await self.customers.patch("cust_1", validate(AFTER, partial=True))
        await self.meters.replace(parse_meter({"code": "api_calls", **API_CALLS, "unit": "requests"}))


async def test_snapshot_holds_seller_buyer_zone_locale_and_units(records: Records) -> None:
    books = Books(records)
    invoice = await books.finalized(Settings(**SELLER, invoice_locale="de_DE"))
    assert invoice["snapshot"] == {
        "seller": {"name": "Acme Metering GmbH", "address": ["Hauptstr. 1", "10115 Berlin"]},
        "buyer": {"id": "cust_1", "name": "Globex Corporation", "email": "billing@globex.example"},
        "timezone": "UTC",
        "locale": "de_DE",
        "units": {"api_calls": "calls", "bandwidth": "bytes"},
    }
    unknown = {**invoice, "customer_id": "cust_gone", "lines": [{**invoice["lines"][1], "meter": "gone"}]}
    snap = await take_snapshot(books.customers, books.meters, Settings(), unknown)
    assert snap["buyer"] == {"id": "cust_gone", "name": None, "email": None} and snap["timezone"] == "UTC"
    assert snap["units"] == {"gone": ""} and snap["seller"] == {"name": "MeterFlow", "address": []}


async def test_finalized_documents_never_change_after_customer_seller_and_meter_edits(
    records: Records, renders: dict[str, int], tmp_path: Path
) -> None:
    """D13: the bytes and the ETag of both documents stay, and the second read renders nothing."""
    books = Books(records)
    invoice = await books.finalized(Settings(**SELLER))
    first = {fmt: await invoice_bytes(records, invoice, fmt) for fmt in ("html", "pdf")}
    assert renders == {"html": 1, "pdf": 1}
    for fmt, (body, sha) in first.items():
        assert sha == hashlib.sha256(body).hexdigest(), fmt
    page, text = first["html"][0].decode(), pdf_text(first["pdf"][0], tmp_path)
    for expected in ("Globex Corporation", "billing@globex.example", "Acme Metering GmbH", "10115 Berlin",
                     "312,500 calls", "Jan 1, 2026 \u2013 Jan 31, 2026"):  # fmt: skip
        assert expected in page and expected in text, expected

    await books.edit_everything()
    live = await take_snapshot(books.customers, books.meters, Settings(invoice_seller_name="Other Seller Ltd"),
                               invoice)  # fmt: skip
    # What the invoice would say if it were built again from live data: everything differs.
    relived = render_html(build_frozen({**invoice, "snapshot": live}))
    kiritimati = "Jan 1, 2026 \u2013 Feb 1, 2026"  # the period's last instant is 1 February there
    for changed in ("Initech LLC", "ap@initech.example", "Other Seller Ltd", "312,500 requests", kiritimati):
        assert changed in relived and changed not in page, changed

    again = await books.invoices.get(invoice["id"])
    assert again is not None and again["snapshot"] == invoice["snapshot"]  # never taken again
    for status in ("finalized", "paid"):  # a later status (or credit) changes no byte either
        later = {**again, "status": status, "amount_credited": "10.00", "amount_due": "190.00"}
        assert {fmt: await invoice_bytes(records, later, fmt) for fmt in ("html", "pdf")} == first
    assert renders == {"html": 1, "pdf": 1}  # served from the store: no second render
    # The model itself depends on the snapshot alone: built now it still says what it said.
    assert render_html(build_frozen(invoice)).encode() == first["html"][0]
    async with records.connect() as conn:
        stored = (await conn.execute(sa.select(sa.func.count()).select_from(rendered_documents))).scalar_one()
    assert stored == 2


async def test_a_frozen_document_carries_no_status_and_no_credit() -> None:
    settings = Settings(**SELLER)
    invoice = {"id": "inv_" + "2" * 24, "number": "MF-2026-000007", "status": "void", "customer_id": "cust_1",
               "subscription_id": "sub_1", **_priced_json(), "issued_at": JAN_2026.end, "due_at": None,
               "amount_credited": "13.57", "amount_due": "186.43"}  # fmt: skip
    invoice["snapshot"] = _snapshot(settings)
    doc = build_frozen(invoice)
    assert doc.stamp is None and doc.title == "Invoice MF-2026-000007"
    page = render_html(doc)
    for absent in ("VOID", "PAID", "13.57", "186.43"):
        assert absent not in page, absent
    assert "Total (EUR)" in page
    as_draft = build({**invoice, "status": "draft", "number": None}, None, Seller("Acme", ()), {}, "en_US")
    assert as_draft.stamp == "DRAFT" and "DRAFT" in render_html(as_draft)  # drafts keep theirs


async def test_concurrent_first_reads_store_one_row_and_answer_its_bytes(records: Records) -> None:
    calls: list[int] = []
    # Every reader passes the store's first look before any renders (4 threads: the default executor has 5 or
    # more), so all of them race to insert; a render that outlived its moment would break the barrier.
    together = threading.Barrier(4, timeout=30)

    def render() -> bytes:
        calls.append(1)
        together.wait()
        return f"render {len(calls)} {secrets.token_hex(8)}".encode()  # each render differs

    answers = await asyncio.gather(*(frozen(records, "inv_" + "3" * 24, "pdf", render) for _ in range(4)))
    assert len(calls) == 4
    assert len(set(answers)) == 1, answers  # every reader answers the one row that got in
    body, sha = answers[0]
    assert sha == hashlib.sha256(body).hexdigest()
    async with records.connect() as conn:
        rows = (await conn.execute(sa.select(rendered_documents.c.body, rendered_documents.c.sha256))).all()
    assert [(bytes(b), s) for b, s in rows] == [(body, sha)]
    assert await frozen(records, "inv_" + "3" * 24, "pdf", lambda: b"never") == (body, sha)  # stored: not rendered
    other = await frozen(records, "inv_" + "3" * 24, "html", lambda: b"<p>html</p>")
    assert other == (b"<p>html</p>", hashlib.sha256(b"<p>html</p>").hexdigest())  # a format is its own row


def _priced_json(quantity: str = "312500") -> dict[str, Any]:
    meters = {m.code: m for m in configured_meters(Settings())}
    usage = {"api_calls": MeterUsage(Decimal(quantity)), "bandwidth": MeterUsage(Decimal("2500000000"))}
    return priced_period_json(price_period(parse_plan(PLAN, meters), usage,
                                           ServicePeriod(JAN_2026, JAN_2026.start, JAN_2026.end)))  # fmt: skip


def _snapshot(settings: Settings, units: dict[str, str] | None = None) -> dict[str, Any]:
    return {"seller": {"name": settings.invoice_seller_name, "address": ["Hauptstr. 1", "10115 Berlin"]},
            "buyer": {"id": "cust_1", "name": "Globex Corporation", "email": None}, "timezone": "UTC",
            "locale": "en_US", "units": units or {"api_calls": "calls", "bandwidth": "bytes"}}  # fmt: skip


QTY_38 = "98765432109876543210987654321.987654321"  # 29 + 9 digits: Decimal128(38, 9)'s widest


async def test_38_digit_numbers_render_exactly_on_frozen_invoices_and_credit_notes(
    records: Records, tmp_path: Path
) -> None:
    """D10 on the frozen path: 38 significant digits in the quantity, the line and credit amounts in full."""
    invoice = {"id": "inv_" + "4" * 24, "number": "MF-2026-000009", "status": "finalized", "customer_id": "cust_1",
               "subscription_id": "sub_1", **_priced_json(QTY_38), "issued_at": JAN_2026.end, "due_at": None,
               "snapshot": _snapshot(Settings(**SELLER))}  # fmt: skip
    line = invoice["lines"][1]
    assert line["quantity"] == QTY_38
    big = "1234567890123456789012345678901234567.89"  # a credit of 39 significant digits
    note = _note(invoice, [{"invoice_line": 1, "line_key": line["line_key"], "description": "API calls",
                            "quantity": QTY_38, "amount": big}], big)  # fmt: skip
    quantity = "98,765,432,109,876,543,210,987,654,321.987654321 calls"
    expected = {
        "invoice": [quantity, f"€{Decimal(line['amount']):,f}"],
        "note": [quantity, "€1,234,567,890,123,456,789,012,345,678,901,234,567.89"],
    }
    for fmt in ("html", "pdf"):
        bodies = {"invoice": (await invoice_bytes(records, invoice, fmt))[0],
                  "note": (await credit_note_bytes(records, note, invoice, fmt))[0]}  # fmt: skip
        for what, body in bodies.items():
            text = body.decode() if fmt == "html" else pdf_text(body, tmp_path)
            for x in expected[what]:
                assert x in text, (what, fmt, x)


def _note(invoice: dict[str, Any], lines: list[dict[str, Any]], total: str, reason: str = "late_correction",
          memo: str = "") -> dict[str, Any]:  # fmt: skip
    return {"id": "cn_" + secrets.token_hex(12), "number": "CN-2026-000001", "invoice_id": invoice["id"],
            "invoice_number": invoice["number"], "customer_id": invoice["customer_id"],
            "subscription_id": invoice["subscription_id"], "reason": reason, "currency": invoice["currency"],
            "total": total, "memo": memo, "created_at": JAN_2026.end + 86_400_000 * 3, "lines": lines}  # fmt: skip


async def test_credit_note_document_names_its_invoice_reason_lines_and_total(
    records: Records, renders: dict[str, int], tmp_path: Path
) -> None:
    invoice = {"id": "inv_" + "5" * 24, "number": "MF-2026-000011", "status": "paid", "customer_id": "cust_1",
               "subscription_id": "sub_1", **_priced_json(), "issued_at": JAN_2026.end, "due_at": None,
               "snapshot": _snapshot(Settings(**SELLER))}  # fmt: skip
    late_for = {"subscription_id": "sub_1", "start": JAN_2026.start, "end": JAN_2026.end}
    note = _note(invoice, [
        {"invoice_line": 1, "line_key": "1", "late_for": late_for, "description": "API calls", "quantity": "2500",
         "amount": "1.00"},
        {"invoice_line": None, "line_key": "minimum", "description": "Minimum adjustment", "quantity": "0",
         "amount": "12.57"},
    ], "13.57", reason="retroactive_change", memo="Plan changed on 15 January")  # fmt: skip
    doc = build_credit_note(note, invoice)
    assert doc.title == "Credit note CN-2026-000001" and doc.stamp is None
    assert dict(doc.facts) == {"Credit note number": "CN-2026-000001", "Credits invoice": "MF-2026-000011",
                               "Date": "Feb 4, 2026", "Reason": "Retroactive change",
                               "Memo": "Plan changed on 15 January"}  # fmt: skip
    assert [r.cells for r in doc.rows if not r.detail] == [("API calls", "2,500 calls", "2", "€1.00"),
                                                           ("Minimum adjustment", "", "", "€12.57")]  # fmt: skip
    assert doc.totals == (("Total credited (EUR)", "€13.57"),)
    html, sha = await credit_note_bytes(records, note, invoice, "html")
    pdf, _ = await credit_note_bytes(records, note, invoice, "pdf")
    text = pdf_text(pdf, tmp_path)
    cells = [c for r in doc.rows for c in r.cells if c] + [v for kv in doc.totals for v in kv] + [doc.title]
    for cell in [*cells, "Acme Metering GmbH", "Globex Corporation", "MF-2026-000011", "Retroactive change"]:
        assert cell in html.decode() and cell in text, cell
    assert "Jan 1, 2026 \u2013 Jan 31, 2026" in text
    # Frozen like an invoice: the same bytes again, rendered once per format.
    assert await credit_note_bytes(records, note, invoice, "html") == (html, sha)
    assert renders == {"html": 1, "pdf": 1}


# --- over HTTP --------------------------------------------------------------------------------------------


def _draft_in(data_dir: str) -> str:
    async def make() -> str:
        records = open_records(Settings(data_dir=data_dir))
        async with started(records):
            return str((await draft(Invoices(records, None)))["id"])

    return asyncio.run(make())


def test_finalized_invoice_over_http_same_bytes_etag_and_304_after_every_edit(
    make_backend: Callable[[str], Backend], start_server: Callable[..., MeterFlowServer], tmp_path: Path
) -> None:
    backend = make_backend("embedded")
    seller = {"MF_INVOICE_SELLER_NAME": "Acme Metering GmbH", "MF_INVOICE_SELLER_ADDRESS": "Hauptstr. 1|10115 Berlin"}
    server = start_server(backend, **seller)
    iid = _draft_in(backend.env["MF_DATA_DIR"])
    url = f"/v1/invoices/{iid}"
    with httpx.Client(base_url=server.url, headers=server.auth, timeout=60) as c:
        assert c.put("/v1/customers/cust_1", json=BEFORE).status_code == 201
        live = c.get(url + ".html")
        assert live.status_code == 200 and "etag" not in live.headers and "DRAFT" in live.text  # drafts render live
        assert c.post(url + "/finalize").status_code == 200
        first = {fmt: c.get(f"{url}.{fmt}") for fmt in ("html", "pdf")}
        for fmt, r in first.items():
            assert r.status_code == 200 and r.headers["etag"] == f'"{hashlib.sha256(r.content).hexdigest()}"', fmt
            tag = r.headers["etag"]
            not_modified = c.get(f"{url}.{fmt}", headers={"If-None-Match": f'"other", W/{tag}'})
            assert (
                not_modified.status_code == 304 and not_modified.content == b"" and not_modified.headers["etag"] == tag
            )
            assert c.get(f"{url}.{fmt}", headers={"If-None-Match": '"other"'}).content == r.content
        assert "DRAFT" not in first["html"].text and "Globex Corporation" in first["html"].text
        assert c.patch("/v1/customers/cust_1", json=AFTER).status_code == 200
        assert c.post(url + "/mark_paid").status_code == 200
        for fmt, r in first.items():
            again = c.get(f"{url}.{fmt}")
            assert (again.content, again.headers["etag"]) == (r.content, r.headers["etag"]), fmt
    server.stop()
    # Another seller in the settings: the frozen invoice keeps its own, a new draft shows the new one.
    server = start_server(backend, MF_INVOICE_SELLER_NAME="Other Seller Ltd")
    with httpx.Client(base_url=server.url, headers=server.auth, timeout=60) as c:
        for fmt, r in first.items():
            again = c.get(f"{url}.{fmt}")
            assert (again.content, again.headers["etag"]) == (r.content, r.headers["etag"]), fmt
        other = _draft_in_subscription(backend.env["MF_DATA_DIR"])
        page = c.get(f"/v1/invoices/{other}.html").text
        assert "Other Seller Ltd" in page and "Initech LLC" in page  # the live data did change
    text = pdf_text(first["pdf"].content, tmp_path)
    assert "Globex Corporation" in text and "Acme Metering GmbH" in text and "Initech LLC" not in text


def _draft_in_subscription(data_dir: str) -> str:
    async def make() -> str:
        records = open_records(Settings(data_dir=data_dir))
        async with started(records):
            return str((await draft(Invoices(records, None), "cust_1", "sub_2"))["id"])

    return asyncio.run(make())


def _credit_note_in(data_dir: str, invoice_id: str, number: str) -> str:
    """A credit note row on the invoice, as billing/credit_notes.py writes one."""

    async def make() -> str:
        records = open_records(Settings(data_dir=data_dir))
        async with started(records):
            invoice = await Invoices(records, None).get(invoice_id)
            assert invoice is not None
            line = invoice["lines"][1]
            nid = "cn_" + secrets.token_hex(12)
            document = {"invoice_number": invoice["number"], "memo": "goodwill", "lines": [
                {"invoice_line": 1, "line_key": line.get("line_key", "1"), "description": line["description"],
                 "quantity": "0", "amount": "5.00"}]}  # fmt: skip
            async with records.begin() as conn:
                await conn.execute(sa.insert(credit_notes).values(
                    id=nid, number=number, invoice_id=invoice_id, customer_id=invoice["customer_id"],
                    subscription_id=invoice["subscription_id"], reason="manual", currency=invoice["currency"],
                    total="5.00", document=document, created_at=JAN_2026.end))  # fmt: skip
            return nid

    return asyncio.run(make())


def test_credit_notes_over_http_list_read_and_frozen_documents(
    make_backend: Callable[[str], Backend], start_server: Callable[..., MeterFlowServer], tmp_path: Path
) -> None:
    backend = make_backend("embedded")
    server = start_server(backend, MF_INVOICE_SELLER_NAME="Acme Metering GmbH")
    data = backend.env["MF_DATA_DIR"]
    iid = _draft_in(data)
    with httpx.Client(base_url=server.url, headers=server.auth, timeout=60) as c:
        assert c.put("/v1/customers/cust_1", json=BEFORE).status_code == 201
        invoice = c.post(f"/v1/invoices/{iid}/finalize").json()
        notes = [_credit_note_in(data, iid, f"CN-2026-00000{i}") for i in (1, 2)]
        page = c.get("/v1/credit_notes", params={"invoice_id": iid, "limit": 1}).json()
        assert [n["id"] for n in page["data"]] == sorted(notes)[:1] and page["next_cursor"] == sorted(notes)[0]
        rest = c.get("/v1/credit_notes", params={"customer_id": "cust_1", "cursor": page["next_cursor"]}).json()
        assert [n["id"] for n in rest["data"]] == sorted(notes)[1:] and rest["next_cursor"] is None
        assert c.get("/v1/credit_notes", params={"customer_id": "nobody"}).json()["data"] == []
        assert c.get("/v1/credit_notes", params={"invoice_id": "inv_x"}).status_code == 400
        note = c.get(f"/v1/credit_notes/{notes[0]}").json()
        assert note["invoice_number"] == invoice["number"] and note["total"] == "5.00"
        assert c.get("/v1/credit_notes/cn_" + "0" * 24).status_code == 404
        assert c.get("/v1/credit_notes/cn_" + "0" * 24 + ".pdf").status_code == 404
        docs = {fmt: c.get(f"/v1/credit_notes/{notes[0]}.{fmt}") for fmt in ("html", "pdf")}
        for fmt, r in docs.items():
            assert r.status_code == 200 and r.headers["etag"] == f'"{hashlib.sha256(r.content).hexdigest()}"', fmt
            assert (
                c.get(f"/v1/credit_notes/{notes[0]}.{fmt}", headers={"If-None-Match": r.headers["etag"]}).status_code
                == 304
            )
        assert docs["pdf"].headers["content-type"] == "application/pdf" and docs["pdf"].content[:5] == b"%PDF-"
        assert c.patch("/v1/customers/cust_1", json=AFTER).status_code == 200
        assert c.get(f"/v1/credit_notes/{notes[0]}.pdf").content == docs["pdf"].content
    text = pdf_text(docs["pdf"].content, tmp_path)
    for expected in ("Credit note CN-2026-000001", invoice["number"], "Manual credit", "goodwill", "€5.00",
                     "Globex Corporation", "Acme Metering GmbH"):  # fmt: skip
        assert expected in text and expected in docs["html"].text, expected
