"""Query parameters read strictly: ASCII integers within stated bounds, errors that name the parameter."""

from __future__ import annotations

import re
from collections.abc import Mapping

from meterflow.kernel.errors import FieldError

# ASCII digits only: `int()` also takes '١٢' and `str.isdigit()` passes '²', which int() refuses.
_INTEGER = re.compile(r"-?[0-9]{1,19}")

# Epoch milliseconds that every window computation can turn into a date in any
# time zone (Python's datetime ends at year 9999): 1970-01-01 to 9999-01-01 UTC.
EPOCH_MS_MIN = 0
EPOCH_MS_MAX = 253_370_764_800_000


def integer(params: Mapping[str, str], name: str, lo: int, hi: int, default: int | None = None,
            what: str = "an integer") -> int:  # fmt: skip
    """`params[name]` as an int in [lo, hi], `default` when absent, else a FieldError naming `name`."""
    raw = params.get(name)
    if raw is None or raw == "":
        if default is not None:
            return default
        raise FieldError(name, f"`{name}` is required: {what} from {lo} to {hi}.")
    if not _INTEGER.fullmatch(raw) or not lo <= int(raw) <= hi:
        raise FieldError(name, f"`{name}` must be {what} from {lo} to {hi}, got {raw[:40]!r}.")
    return int(raw)


def epoch_ms(params: Mapping[str, str], name: str) -> int:
    """A required instant in epoch milliseconds, within the dates the windows can compute."""
    return integer(params, name, EPOCH_MS_MIN, EPOCH_MS_MAX,
                   what="epoch milliseconds (1970-01-01 to 9999-01-01 UTC)")  # fmt: skip
