"""The meters in force: those of the config (read-only) plus those made through the API."""

from __future__ import annotations

from meterflow.metering.meters import CODE_RE, Meter, parse_meter
from meterflow.storage.base import Storage
from meterflow.storage.documents import Documents


class MeterConflict(Exception):
    """The change collides with an existing meter or a config-defined one."""


class MeterCatalog:
    def __init__(self, storage: Storage, config_meters: tuple[Meter, ...]) -> None:
        self._config = {m.code: m for m in config_meters}
        # Read on every call: every worker sees a change at once.
        self._docs = Documents(storage, "meter")

    async def get(self, code: str) -> Meter | None:
        if code in self._config:
            return self._config[code]
        if not CODE_RE.fullmatch(code):  # no such meter can exist: no query
            return None
        doc = await self._docs.get(code)
        return parse_meter(doc, "api") if doc else None

    async def list(self, after: str = "", limit: int = 100) -> list[Meter]:
        config = [m for code, m in sorted(self._config.items()) if code > after]
        stored = [parse_meter(d, "api") for d in await self._docs.page(after, limit)]
        merged = sorted({m.code: m for m in stored + config}.values(), key=lambda m: m.code)
        return merged[:limit]

    async def create(self, meter: Meter) -> None:
        if await self.get(meter.code) is not None:
            raise MeterConflict(f"Meter {meter.code!r} already exists; use PUT /v1/meters/{meter.code} to replace it.")
        await self._docs.put(meter.code, _body(meter))

    async def replace(self, meter: Meter) -> bool:
        """Creates or replaces; returns True when it created."""
        self._writable(meter.code)
        existed = await self._docs.get(meter.code) is not None
        await self._docs.put(meter.code, _body(meter))
        return not existed

    async def delete(self, code: str) -> bool:
        self._writable(code)
        if not CODE_RE.fullmatch(code) or await self._docs.get(code) is None:
            return False
        await self._docs.delete(code)
        return True

    def _writable(self, code: str) -> None:
        if code in self._config:
            raise MeterConflict(f"Meter {code!r} is defined in the configuration file; change it there.")


def _body(m: Meter) -> dict[str, object]:
    body = m.as_json()
    del body["source"]
    return body
