"""Invoice documents: one model of what the document says, rendered to HTML and to Typst (typeset to PDF).

The content (labels, order, formatted numbers and dates) is decided once, in
`build`; the two renderers only know how to lay out its parts, so the HTML
page and the PDF cannot say different things. Money and dates are formatted
for the locale with Babel; the PDF is typeset by the `typst` package with its
bundled fonts (no system fonts, so a document renders the same everywhere).
"""

from __future__ import annotations

import datetime as dt
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


@dataclass(frozen=True)
class Party:
    heading: str
    lines: tuple[str, ...]


@dataclass(frozen=True)
class Row:
    cells: tuple[str, str, str, str]  # description, quantity, unit price, amount
    detail: bool = False  # a tier of the line above


@dataclass(frozen=True)
class Document:
    title: str
    stamp: str | None  # DRAFT, PAID, VOID
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


def _day(ms: int, tz: ZoneInfo, locale: Locale) -> str:
    return format_date(dt.datetime.fromtimestamp(ms / 1000, tz).date(), "medium", locale=locale)


def build(invoice: Mapping[str, Any], customer: Mapping[str, Any] | None, seller: Seller,
          units: Mapping[str, str], locale_name: str) -> Document:  # fmt: skip
    """The document of an invoice (the API's JSON shape); `units` maps meter codes to their units."""
    locale = Locale.parse(locale_name)
    cur = invoice["currency"]
    tz = ZoneInfo((customer or {}).get("timezone") or "UTC")

    def money(x: str | Decimal) -> str:
        return format_currency(Decimal(x), cur, locale=locale)

    def price(x: str | Decimal) -> str:
        return format_currency(Decimal(x), cur, format=UNIT_PRICE, locale=locale, currency_digits=False)

    def qty(x: str | Decimal, unit: str = "") -> str:
        return (format_decimal(Decimal(x), format=QUANTITY, locale=locale) + (f" {unit}" if unit else "")).strip()

    rows: list[Row] = []
    for ln in invoice["lines"]:
        unit = units.get(ln["meter"] or "", "")
        desc = ln["description"] or (ln["meter"] or ln["charge"]).replace("_", " ").capitalize()
        if ln.get("dimension"):
            desc += " (" + ", ".join(f"{k}: {v}" for k, v in ln["dimension"].items()) + ")"
        tiers = ln.get("tiers") or []
        unit_price = price(tiers[-1]["unit_amount"]) if len(tiers) == 1 else ""
        rows.append(Row((desc, qty(ln["quantity"], unit if ln["meter"] else ""), unit_price, money(ln["amount"]))))
        if len(tiers) > 1:
            lower = Decimal(0)
            for t in tiers:
                span = f"{qty(lower)} {DASH} {qty(t['up_to'])}" if t["up_to"] is not None else f"over {qty(lower)}"
                flat = f" + {money(t['flat_amount'])}" if Decimal(t["flat_amount"]) else ""
                rows.append(Row((f"Tier {span}", qty(t["quantity"], unit), price(t["unit_amount"]) + flat,
                                 price(t["amount"])), detail=True))  # fmt: skip
                lower = Decimal(t["up_to"]) if t["up_to"] is not None else lower
    period = invoice["period"]
    first, last = _day(period["start"], tz, locale), _day(period["end"] - 1, tz, locale)
    facts = [("Invoice number", invoice["number"] or "draft (numbered when finalized)"),
             ("Period", f"{first} {DASH} {last}")]  # fmt: skip
    if invoice.get("issued_at"):
        facts.append(("Issued", _day(invoice["issued_at"], tz, locale)))
    if invoice.get("due_at"):
        facts.append(("Due", _day(invoice["due_at"], tz, locale)))
    totals = [("Subtotal", money(invoice["subtotal"]))]
    if Decimal(invoice.get("minimum_adjustment") or 0):
        totals.append((f"Minimum ({money(invoice['minimum'])}) adjustment", money(invoice["minimum_adjustment"])))
    if invoice.get("late_usage"):
        totals.append(("Late usage of earlier periods", money(invoice["late_usage"])))
    totals.append((f"Total ({cur})", money(invoice["total"])))
    c = customer or {}
    buyer = tuple(x for x in (c.get("name"), c.get("email"), f"Customer {invoice['customer_id']}") if x)
    stamp = {"draft": "DRAFT", "paid": "PAID", "void": "VOID"}.get(invoice["status"])
    return Document(
        title=f"Invoice {invoice['number']}" if invoice["number"] else "Draft invoice",
        stamp=stamp, seller=Party("From", (seller.name, *seller.address)), customer=Party("Bill to", buyer),
        facts=tuple(facts), columns=("Description", "Quantity", "Unit price", "Amount"), rows=tuple(rows),
        totals=tuple(totals), note=f"Plan {invoice['plan']}. Amounts in {locale.currencies.get(cur, cur)}.",
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
    cells = [f"table.header({', '.join(f'strong({_s(c)})' for c in doc.columns)})", "table.hline()"]
    for r in doc.rows:
        if r.detail:
            cells.append(", ".join(f"text(fill: luma(90), size: 8.5pt, {_s(x)})" for x in r.cells))
        else:
            cells.append(", ".join(_s(x) for x in r.cells))
    out.append("#table(columns: (1fr, auto, auto, auto), align: (left, right, right, right), stroke: none, "
               "inset: 4pt, " + ", ".join(cells) + ")")  # fmt: skip
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
