"""Invalid input that names its culprit: a field of a document or a query parameter."""

from __future__ import annotations


class FieldError(ValueError):
    """`field` names what is wrong; `message` is one sentence for people."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field
        self.message = message
