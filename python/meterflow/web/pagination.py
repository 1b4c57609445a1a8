"""Pages of a list: the `limit` and `cursor` a caller sends, and the page answered with its `next_cursor`."""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from starlette.requests import Request
from starlette.responses import Response

from meterflow.kernel.errors import FieldError
from meterflow.kernel.params import integer
from meterflow.web.errors import ApiError
from meterflow.web.responses import json_response

PAGE_MAX = 500  # items of one list page
# Every listed id (customer, meter code, key id) is of this alphabet and length.
CURSOR_RE = re.compile(r"[A-Za-z0-9_-]{0,255}")
T = TypeVar("T")


def page_params(request: Request, max_limit: int = PAGE_MAX) -> tuple[int, str]:
    """`limit` (1 to max_limit, default 100) and `cursor` of a list route, or a 400 naming the parameter."""
    try:
        limit = integer(request.query_params, "limit", 1, max_limit, default=100)
    except FieldError as e:
        raise ApiError("invalid_parameter", e.message) from None
    cursor = request.query_params.get("cursor", "")
    if not CURSOR_RE.fullmatch(cursor):
        raise ApiError("invalid_parameter", "`cursor` must be the `next_cursor` of a previous page (an id).")
    return limit, cursor


@dataclass(frozen=True)
class Page(Generic[T]):
    """One page of a list read with `limit + 1` rows: the rows to show and the cursor of the next page."""

    rows: list[T]
    next_cursor: str | None  # None on the last page


def by_id(row: Any) -> str:
    return str(row["id"])


def page_of(rows: Sequence[T], limit: int, cursor_of: Callable[[T], str] = by_id) -> Page[T]:
    """The page of `rows`, read with `limit + 1`: a row past `limit` means another page follows."""
    shown = list(rows[:limit])
    return Page(shown, cursor_of(shown[-1]) if len(rows) > limit and shown else None)


def page_response(rows: Sequence[T], limit: int, cursor_of: Callable[[T], str] = by_id,
                  render: Callable[[T], Any] | None = None) -> Response:  # fmt: skip
    """`{"data": [...], "next_cursor": ...}` of a list read with `limit + 1` rows."""
    page = page_of(rows, limit, cursor_of)
    data = page.rows if render is None else [render(r) for r in page.rows]
    return json_response({"data": data, "next_cursor": page.next_cursor})
