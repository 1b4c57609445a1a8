"""Identifiers: the rule for the ids callers choose (customers, subjects) and the shapes of the ids MeterFlow makes."""

from __future__ import annotations

import re

# The Rust core checks an event's `customer_id` by the same rule (rust_core/src/validate.rs).
ID_RE = re.compile(r"[A-Za-z0-9_-]{1,255}")
ID_RULE = "1 to 255 of A-Z, a-z, 0-9, '_' or '-'"

INVOICE_ID_RE = re.compile(r"inv_[0-9a-f]{24}")
INVOICE_ID_RULE = "inv_ and 24 of 0-9, a-f"
CREDIT_NOTE_ID_RE = re.compile(r"cn_[0-9a-f]{24}")
WEBHOOK_ID_RE = re.compile(r"wh_[0-9a-f]{24}")
