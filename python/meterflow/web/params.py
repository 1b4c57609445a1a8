"""Ids read from a request: a path's id (an id of the wrong shape names no record) and a list's id filter."""

from __future__ import annotations

import re

from starlette.requests import Request

from meterflow.kernel.ids import ID_RE, ID_RULE
from meterflow.web.errors import ApiError


def path_id(request: Request, name: str, pattern: re.Pattern[str], code: str, message: str) -> str:
    """`request.path_params[name]`, or the `code` answer when it is not of `pattern` (`message` may name the
    id as `{id}`, cut to 100 characters)."""
    value = str(request.path_params[name])
    if not pattern.fullmatch(value):
        raise ApiError(code, message.format(id=repr(value[:100])))
    return value


def id_filter(request: Request, name: str, pattern: re.Pattern[str] = ID_RE, rule: str = ID_RULE) -> str:
    """A list's optional filter by an id: "" when absent or empty, else an id of `pattern` or a 400 naming it."""
    value = request.query_params.get(name, "")
    if value and not pattern.fullmatch(value):
        raise ApiError("invalid_parameter", f"`{name}` must be {rule}.")
    return value
