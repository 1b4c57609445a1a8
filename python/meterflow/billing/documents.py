"""Invoice and credit-note documents: one model of what a document says, rendered to HTML and to Typst (PDF).

The content (labels, order, formatted numbers and dates) is decided once, in
`build` (a draft, from live data), `build_frozen` (a finalized invoice, from
the snapshot taken when it was finalized) or `build_credit_note`; the two
renderers only know how to lay out its parts, so the HTML page and the PDF
cannot say different things. Money and dates are formatted for the locale with
Babel, in a 100-digit decimal context with no rounding, so every number the
plan rules allow (38 significant digits) shows every digit; the PDF is typeset
by the `typst` package with its bundled fonts (no system fonts, so a document
renders the same everywhere).
"""

from __future__ import annotations

import datetime as dt
import decimal
import html
from collections.abc import Mapping
from dataclasses import dataclass
from decimal import Decimal
from typing import Any
from zoneinfo import ZoneInfo

import typst
from babel import Locale
from babel.dates import format_date
from babel.numbers import format_currency, format_decimal

QUANTITY = "#,##0.#########"
DASH = "\u2013"  # an en dash between the ends of a range
UNIT_PRICE = "¤#,##0.00##########"
# Babel works in the current decimal context; the default's 28 digits refuse (InvalidOperation) the 38
# significant digits of a quantity, and the 44 + 21 of an exact tier amount. 100 holds them all.
FORMAT_CONTEXT = decimal.Context(prec=100, rounding=decimal.ROUND_HALF_UP)
REASONS = {"retroactive_change": "Retroactive change", "late_correction": "Correction of late usage",
           "manual": "Manual credit"}  # fmt: skip


@dataclass(frozen=True)
class Party:
    heading: str
    lines: tuple[str, ...]


@dataclass(frozen=True)
class Row:
    cells: tuple[str, str, str, str]  # under the document's four columns (description first)
    detail: bool = False  # a tier of the line above


@dataclass(frozen=True)
class Document:
    title: str
    stamp: str | None  # DRAFT; a finalized document never changes, so it carries no status
    seller: Party
    customer: Party
    facts: tuple[tuple[str, str], ...]
    columns: tuple[str, str, str, str]
    rows: tuple[Row, ...]
    totals: tuple[tuple[str, str], ...]
    note: str


@dataclass(frozen=True)
class Seller:
    name: str
    address: tuple[str, ...]


@dataclass(frozen=True)
class Setting:
    """What a document shows besides its own record: the parties, time zone, locale and meter units."""

    seller: Seller
    buyer: tuple[str, ...]
    timezone: str
    locale: str
    units: Mapping[str, str]

    @classmethod
    def of_snapshot(cls, snap: Mapping[str, Any]) -> Setting:
        """The setting frozen in an invoice at finalization (billing/snapshot.py's `take_snapshot`)."""
        b = snap["buyer"]
        seller = Seller(snap["seller"]["name"], tuple(snap["seller"]["address"]))
        return cls(seller, _buyer(b.get("name"), b.get("email"), b["id"]), snap["timezone"], snap["locale"],
                   dict(snap["units"]))  # fmt: skip

    def seller_party(self) -> Party:
        return Party("From", (self.seller.name, *self.seller.address))


def _buyer(name: str | None, email: str | None, customer_id: str) -> tuple[str, ...]:
    return tuple(x for x in (name, email, f"Customer {customer_id}") if x)


class _Format:
    """The locale's numbers, dates and money of one currency; call inside `localcontext(FORMAT_CONTEXT)`.
    `decimal_quantization=False`: a pattern's places are a minimum, never a cut, so nothing is rounded."""

    def __init__(self, setting: Setting, currency: str) -> None:
        self.locale = Locale.parse(setting.locale)
        self.tz = ZoneInfo(setting.timezone or "UTC")
        self.cur = currency

    def money(self, x: str | Decimal) -> str:
        return format_currency(Decimal(x), self.cur, locale=self.locale, decimal_quantization=False)

    def price(self, x: str | Decimal) -> str:
        return format_currency(Decimal(x), self.cur, format=UNIT_PRICE, locale=self.locale, currency_digits=False,
                               decimal_quantization=False)  # fmt: skip

    def qty(self, x: str | Decimal, unit: str = "") -> str:
        text = format_decimal(Decimal(x), format=QUANTITY, locale=self.locale, decimal_quantization=False)
        return (text + (f" {unit}" if unit else "")).strip()

    def day(self, ms: int) -> str:
        return format_date(dt.datetime.fromtimestamp(ms / 1000, self.tz).date(), "medium", locale=self.locale)

    def span(self, start: int, end: int) -> str:
        """The days of [start, end)."""
        return f"{self.day(start)} {DASH} {self.day(end - 1)}"

    def currency_name(self) -> str:
        return str(self.locale.currencies.get(self.cur, self.cur))


def build(invoice: Mapping[str, Any], customer: Mapping[str, Any] | None, seller: Seller,
          units: Mapping[str, str], locale_name: str) -> Document:  # fmt: skip
    """The document of a draft (the API's JSON shape) from live data; `units` maps meter codes to their units."""
    c = customer or {}
    setting = Setting(seller, _buyer(c.get("name"), c.get("email"), invoice["customer_id"]),
                      c.get("timezone") or "UTC", locale_name, units)  # fmt: skip
    return _invoice_document(invoice, setting, "DRAFT" if invoice["status"] == "draft" else None)


def build_frozen(invoice: Mapping[str, Any]) -> Document:
    """The document of a finalized (paid, void) invoice, from its snapshot alone: no live customer, seller or
    meter, and nothing that changes after finalization (status, payments, credits), so it never changes."""
    return _invoice_document(invoice, Setting.of_snapshot(invoice["snapshot"]), None)


def _invoice_document(invoice: Mapping[str, Any], setting: Setting, stamp: str | None) -> Document:
    with decimal.localcontext(FORMAT_CONTEXT):
        return _invoice_model(invoice, setting, stamp)


def _invoice_model(invoice: Mapping[str, Any], setting: Setting, stamp: str | None) -> Document:
    f = _Format(setting, invoice["currency"])
    units = setting.units
    rows: list[Row] = []
    for ln in invoice["lines"]:
        meter = ln.get("meter")
        unit = units.get(meter or "", "")
        desc = ln["description"] or (meter or ln["charge"]).replace("_", " ").capitalize()
        if ln.get("dimension"):
            desc += " (" + ", ".join(f"{k}: {v}" for k, v in ln["dimension"].items()) + ")"
        tiers = ln.get("tiers") or []
        unit_price = f.price(tiers[-1]["unit_amount"]) if len(tiers) == 1 else ""
        rows.append(Row((desc, f.qty(ln["quantity"], unit if meter else ""), unit_price, f.money(ln["amount"]))))
        if len(tiers) > 1:
            lower = Decimal(0)
            for t in tiers:
                top = t["up_to"]
                span = f"{f.qty(lower)} {DASH} {f.qty(top)}" if top is not None else f"over {f.qty(lower)}"
                flat = f" + {f.price(t['flat_amount'])}" if Decimal(t["flat_amount"]) else ""
                rows.append(Row((f"Tier {span}", f.qty(t["quantity"], unit), f.price(t["unit_amount"]) + flat,
                                 f.price(t["amount"])), detail=True))  # fmt: skip
                lower = Decimal(top) if top is not None else lower
    facts = [("Invoice number", invoice["number"] or "draft (numbered when finalized)")]
    if invoice.get("period"):
        facts.append(("Period", f.span(invoice["period"]["start"], invoice["period"]["end"])))
    if invoice.get("issued_at"):
        facts.append(("Issued", f.day(invoice["issued_at"])))
    if invoice.get("due_at"):
        facts.append(("Due", f.day(invoice["due_at"])))
    totals = [("Subtotal", f.money(invoice["subtotal"]))]
    if Decimal(invoice.get("minimum_adjustment") or 0):
        totals.append((f"Minimum ({f.money(invoice['minimum'])}) adjustment", f.money(invoice["minimum_adjustment"])))
    if invoice.get("late_usage"):
        totals.append(("Late usage of earlier periods", f.money(invoice["late_usage"])))
    totals.append((f"Total ({f.cur})", f.money(invoice["total"])))
    plan = f"Plan {invoice['plan']}. " if invoice.get("plan") else ""
    return Document(
        title=f"Invoice {invoice['number']}" if invoice["number"] else "Draft invoice", stamp=stamp,
        seller=setting.seller_party(), customer=Party("Bill to", setting.buyer),
        facts=tuple(facts), columns=("Description", "Quantity", "Unit price", "Amount"), rows=tuple(rows),
        totals=tuple(totals), note=f"{plan}Amounts in {f.currency_name()}.",
    )  # fmt: skip


def build_credit_note(note: Mapping[str, Any], invoice: Mapping[str, Any]) -> Document:
    """The document of a credit note (the API's JSON shape) on `invoice`, from the invoice's snapshot (or the
    note's own, when it has one): the parties, time zone, locale and units of the invoice it credits."""
    setting = Setting.of_snapshot(note.get("snapshot") or invoice["snapshot"])
    with decimal.localcontext(FORMAT_CONTEXT):
        return _credit_note_model(note, invoice, setting)


def _credit_note_model(note: Mapping[str, Any], invoice: Mapping[str, Any], setting: Setting) -> Document:
    f = _Format(setting, note["currency"])
    invoice_lines = invoice.get("lines") or []
    rows: list[Row] = []
    for ln in note["lines"]:
        at = ln.get("invoice_line")  # the credited line's position in the invoice's `lines`; None: its minimum
        credited = invoice_lines[at] if at is not None and 0 <= at < len(invoice_lines) else {}
        meter = credited.get("meter")
        quantity = ln.get("quantity")
        # A credit of an amount alone (a manual one, a prorated flat charge) has no quantity to show.
        qty = f.qty(quantity, setting.units.get(meter, "") if meter else "") if quantity and Decimal(quantity) else ""
        desc = ln.get("description") or credited.get("description") or ln.get("line_key") or ""
        rows.append(Row((desc, qty, "" if at is None else str(at + 1), f.money(ln["amount"]))))
        if ln.get("late_for"):
            late = ln["late_for"]
            period = f"For {f.span(late['start'], late['end'])} of subscription {late['subscription_id']}"
            rows.append(Row((period, "", "", ""), detail=True))
    number = note.get("invoice_number") or invoice.get("number") or note["invoice_id"]
    facts = [("Credit note number", note["number"]), ("Credits invoice", number),
             ("Date", f.day(note["created_at"])), ("Reason", REASONS.get(note["reason"], note["reason"]))]  # fmt: skip
    if note.get("memo"):
        facts.append(("Memo", note["memo"]))
    return Document(
        title=f"Credit note {note['number']}", stamp=None, seller=setting.seller_party(),
        customer=Party("Credit to", setting.buyer),
        facts=tuple(facts), columns=("Description", "Quantity", "Invoice line", "Amount"), rows=tuple(rows),
        totals=((f"Total credited ({f.cur})", f.money(note["total"])),),
        note=f"Credited on invoice {number}. Amounts in {f.currency_name()}.",
    )  # fmt: skip


# --- HTML -------------------------------------------------------------------------------------------------

_CSS = """body{font-family:system-ui,sans-serif;max-width:800px;margin:2em auto;color:#222}
h1{margin-bottom:.2em}.stamp{color:#b00;font-weight:bold;letter-spacing:.1em}
.parties{display:flex;gap:4em;margin:1.5em 0}table{width:100%;border-collapse:collapse}
th,td{padding:.35em .5em;text-align:right}th:first-child,td:first-child{text-align:left}
thead th{border-bottom:1px solid #444}tr.detail td{color:#666;font-size:.9em;padding-left:1.5em}
.totals td{border-top:1px solid #ccc}.totals tr:last-child td{font-weight:bold;border-top:2px solid #444}"""


def render_html(doc: Document) -> str:
    e = html.escape
    out = [f"<!doctype html><html><head><meta charset='utf-8'><title>{e(doc.title)}</title>",
           f"<style>{_CSS}</style></head><body>", f"<h1>{e(doc.title)}</h1>"]  # fmt: skip
    if doc.stamp:
        out.append(f"<p class='stamp'>{e(doc.stamp)}</p>")
    out.append("<div class='parties'>")
    for p in (doc.seller, doc.customer):
        out.append(f"<div><strong>{e(p.heading)}</strong><br>{'<br>'.join(e(x) for x in p.lines)}</div>")
    out.append("</div><table class='facts'>")
    out += [f"<tr><td>{e(k)}</td><td>{e(v)}</td></tr>" for k, v in doc.facts]
    out.append("</table><br><table class='lines'><thead><tr>")
    out += [f"<th>{e(c)}</th>" for c in doc.columns]
    out.append("</tr></thead><tbody>")
    for r in doc.rows:
        cls = " class='detail'" if r.detail else ""
        out.append(f"<tr{cls}>" + "".join(f"<td>{e(x)}</td>" for x in r.cells) + "</tr>")
    out.append("</tbody></table><table class='totals'>")
    out += [f"<tr><td>{e(k)}</td><td>{e(v)}</td></tr>" for k, v in doc.totals]
    out.append(f"</table><p>{e(doc.note)}</p></body></html>")
    return "".join(out)


# --- Typst (PDF) ------------------------------------------------------------------------------------------


def _s(text: str) -> str:
    """A Typst string literal: nothing in it is markup."""
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'


# Characters of a row's three number cells that fit beside its description on an A4 line at 9.5 pt;
# a document with a wider row (numbers of 30 digits and more) puts each number on a line of its own.
_SIDE_BY_SIDE = 64


def _typst_rows(doc: Document) -> str:
    def cell(text: str, detail: bool) -> str:
        return f"text(fill: luma(90), size: 8.5pt, {_s(text)})" if detail else _s(text)

    if all(sum(len(c) for c in r.cells[1:]) <= _SIDE_BY_SIDE for r in doc.rows):
        cells = [f"table.header({', '.join(f'strong({_s(c)})' for c in doc.columns)})", "table.hline()"]
        cells += [", ".join(cell(x, r.detail) for x in r.cells) for r in doc.rows]
        return ("#table(columns: (1fr, auto, auto, auto), align: (left, right, right, right), stroke: none, "
                "inset: 4pt, " + ", ".join(cells) + ")")  # fmt: skip
    # Stacked: the description across the page, then each number under its column's name.
    cells = [f"table.header(strong({_s(doc.columns[0])}), [])", "table.hline()"]
    for r in doc.rows:
        cells.append(f"table.cell(colspan: 2, {cell(r.cells[0], r.detail)})")
        cells += [f"pad(left: 1.5em, {cell(name, True)}), {cell(x, r.detail)}"
                  for name, x in zip(doc.columns[1:], r.cells[1:], strict=True) if x]  # fmt: skip
    return ("#table(columns: (auto, 1fr), align: (left, right), stroke: none, inset: 4pt, "
            + ", ".join(cells) + ")")  # fmt: skip


def render_typst(doc: Document) -> str:
    out = ['#set page(paper: "a4", margin: 2cm)', '#set text(size: 9.5pt)',
           f"#text(size: 20pt, weight: \"bold\", {_s(doc.title)})"]  # fmt: skip
    if doc.stamp:
        out.append(f"#h(1em) #text(fill: rgb(\"#b00000\"), weight: \"bold\", {_s(doc.stamp)})")
    parties = ", ".join(
        "[" + f"#strong({_s(p.heading)}) \\ " + " \\ ".join(f"#{_s(x)}" for x in p.lines) + "]"
        for p in (doc.seller, doc.customer)
    )
    out.append(f"#v(1em)\n#grid(columns: (1fr, 1fr), gutter: 2em, {parties})\n#v(1em)")
    facts = ", ".join(f"{_s(k)}, {_s(v)}" for k, v in doc.facts)
    out.append(f"#table(columns: (auto, auto), stroke: none, inset: 3pt, {facts})\n#v(1em)")
    out.append(_typst_rows(doc))
    totals = []
    for i, (k, v) in enumerate(doc.totals):
        last = i == len(doc.totals) - 1
        totals.append(f"strong({_s(k)}), strong({_s(v)})" if last else f"{_s(k)}, {_s(v)}")
    out.append("#align(right, table(columns: (auto, auto), align: (left, right), stroke: none, inset: 4pt, "
               "table.hline(), " + ", ".join(totals) + "))")  # fmt: skip
    out.append(f"#v(2em)\n#text(size: 8.5pt, {_s(doc.note)})")
    return "\n".join(out) + "\n"


def render_pdf(doc: Document) -> bytes:
    """Typesets the document (CPU work: call it from a thread)."""
    pdf = typst.compile(render_typst(doc).encode(), format="pdf", ignore_system_fonts=True)
    assert isinstance(pdf, bytes)
    return pdf
