"""Optimistic concurrency: a record's version is its ETag; If-Match names the versions a change expects."""

from __future__ import annotations

from dataclasses import dataclass


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
            tag = tag.strip().removeprefix("W/")
            if len(tag) >= 3 and tag[0] == tag[-1] == '"' and tag[1:-1].isdigit():
                versions.add(int(tag[1:-1]))
        return cls(frozenset(versions))

    def allows(self, version: int) -> bool:
        return self.any or version in self.versions

    def check(self, version: int | None) -> None:
        """Raises StaleVersion unless the current version (None: no record) is one expected."""
        if version is None or not self.allows(version):
            raise StaleVersion


def etag(version: int) -> str:
    return f'"{version}"'
