"""Settling a finalized period: what is owed now against what was billed, per line key, as debits and credits.

A pure function (no I/O, Decimal in the 100-digit context): closing gathers
what a period owes now (the period priced with every event stored so far)
and every invoice line that billed it (the period's own invoice, late lines
on later invoices, each with what credit notes took off it), and applies
what comes out: a debit is a late line on a later invoice, a credit goes on
a credit note against the lines that billed the key, newest first, never
more than is left of each. The rules are in the README ("The books after
the fact").
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from decimal import Decimal, localcontext

from meterflow.billing.lines import MINIMUM_KEY
from meterflow.billing.rating import PricedPeriod
from meterflow.kernel.money import EXACT

ZERO = Decimal(0)


@dataclass(frozen=True)
class OwedLine:
    """One line key of a period as priced now."""

    key: str
    charge: str
    meter: str | None
    description: str
    quantity: Decimal
    amount: Decimal
    dimension: tuple[str, str] | None = None  # (price_by property, value)


@dataclass(frozen=True)
class BilledLine:
    """An invoice line that billed a key of the period, and what credit notes took off it."""

    invoice_id: str
    slot: int | None  # its position in the invoice's lines; None: the invoice's own minimum adjustment
    key: str
    quantity: Decimal
    amount: Decimal
    settled_off: Decimal  # taken off by credit notes of settling (retroactive_change, late_correction)
    credited_off: Decimal  # taken off by every credit note, manual ones included
    newest: int  # larger is newer: credits go to the newest lines first

    @property
    def room(self) -> Decimal:
        return self.amount - self.credited_off


@dataclass(frozen=True)
class Debit:
    line: OwedLine
    quantity: Decimal  # owed minus billed
    amount: Decimal  # owed minus billed, > 0


@dataclass(frozen=True)
class Credit:
    billed: BilledLine
    quantity: Decimal  # the fall in quantity (shown on the first credit of a key)
    amount: Decimal  # > 0, at most billed.room


@dataclass(frozen=True)
class Settlement:
    debits: tuple[Debit, ...]
    credits: tuple[Credit, ...]

    @property
    def empty(self) -> bool:
        return not self.debits and not self.credits


def settle(owed: Sequence[OwedLine], billed: Sequence[BilledLine]) -> Settlement:
    """Per line key, `owed - billed` (billed: invoiced minus what settling credited): above 0 a debit,
    below 0 credits spread over the key's billed lines, newest first, each at most its room (what is
    left after every credit note, manual ones included; a manual credit is a concession, so what it
    already gave is not credited twice)."""
    by_key: dict[str, list[BilledLine]] = defaultdict(list)
    for b in billed:
        by_key[b.key].append(b)
    owed_by_key = {o.key: o for o in owed}
    debits: list[Debit] = []
    credits: list[Credit] = []
    with localcontext(EXACT):
        for key in list(owed_by_key) + sorted(k for k in by_key if k not in owed_by_key):
            lines = by_key.get(key, [])
            amount_billed = sum((b.amount - b.settled_off for b in lines), ZERO)
            quantity_billed = sum((b.quantity for b in lines), ZERO)
            o = owed_by_key.get(key)
            diff = (o.amount if o else ZERO) - amount_billed
            dq = (o.quantity if o else ZERO) - quantity_billed
            if diff > 0 and o is not None:
                debits.append(Debit(o, dq, diff))
            elif diff < 0:
                want = -diff
                fall = max(-dq, ZERO)
                for b in sorted(lines, key=lambda b: (-b.newest, b.slot is None, b.slot or 0)):
                    take = min(b.room, want)
                    if take <= 0:
                        continue
                    credits.append(Credit(b, fall, take))
                    fall = ZERO
                    want -= take
                    if want == 0:
                        break
    return Settlement(tuple(debits), tuple(credits))


def owed_lines(priced: PricedPeriod) -> list[OwedLine]:
    """The owed lines of a priced period (with line keys), the minimum adjustment as the key `minimum`."""
    out = [OwedLine(ln.key, ln.charge, ln.meter, ln.description, ln.quantity, ln.amount, ln.dimension)
           for ln in priced.lines]  # fmt: skip
    if priced.minimum_adjustment:
        out.append(OwedLine(MINIMUM_KEY, "minimum", None, "Minimum adjustment", Decimal(1), priced.minimum_adjustment))
    return out
