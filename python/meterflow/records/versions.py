"""Optimistic concurrency: a record's version is its ETag; If-Match names the versions a change expects."""

from __future__ import annotations

import re
from dataclasses import dataclass

VERSION_MAX = 2**31 - 1  # the `version` column is a 32-bit INTEGER on both engines
# ASCII digits only (str.isdigit() passes '²', which int() refuses); 10 digits cover VERSION_MAX.
_TAG = re.compile(r'(?:W/)?"([0-9]{1,10})"')


class StaleVersion(Exception):
    """The record changed since the version the caller named (HTTP 412)."""


@dataclass(frozen=True)
class IfMatch:
    """A parsed If-Match header: `*` (any current version) or a list of versions."""

    versions: frozenset[int] = frozenset()
    any: bool = False

    @classmethod
    def parse(cls, header: str | None) -> IfMatch | None:
        """None when there is no header; entity tags we never issued match nothing."""
        if header is None:
            return None
        if header.strip() == "*":
            return cls(any=True)
        versions = set()
        for tag in header.split(","):
            found = _TAG.fullmatch(tag.strip())
            # A version is an INTEGER column: a tag beyond it names no version (and never reaches SQL).
            if found and 1 <= int(found[1]) <= VERSION_MAX:
                versions.add(int(found[1]))
        return cls(frozenset(versions))

    def allows(self, version: int) -> bool:
        return self.any or version in self.versions

    def check(self, version: int | None) -> None:
        """Raises StaleVersion unless the current version (None: no record) is one expected."""
        if version is None or not self.allows(version):
            raise StaleVersion


def etag(version: int) -> str:
    return f'"{version}"'
