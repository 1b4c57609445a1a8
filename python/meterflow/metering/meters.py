"""A meter: which events count (event type, filters) and how (aggregation of a property)."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Literal

from meterflow.config import ConfigError, Settings, defined_once
from meterflow.kernel.errors import FieldError

AGGREGATIONS = ("COUNT", "SUM", "MAX", "MIN", "AVG", "UNIQUE_COUNT", "LATEST", "TIME_WEIGHTED_SUM")
Aggregation = Literal["COUNT", "SUM", "MAX", "MIN", "AVG", "UNIQUE_COUNT", "LATEST", "TIME_WEIGHTED_SUM"]
# Aggregations over the property's numeric value (exact Decimal128(9)).
# TIME_WEIGHTED_SUM: the integral over time of the last value reported (a gauge), in value-hours.
NUMERIC = ("SUM", "MAX", "MIN", "AVG", "LATEST", "TIME_WEIGHTED_SUM")
CODE_RE = re.compile(r"[a-z][a-z0-9_]{0,62}")
FIELDS = ("code", "name", "event_type", "aggregation", "property", "unit", "filters", "group_by", "description")


class MeterError(FieldError):
    """A meter definition is invalid."""


@dataclass(frozen=True)
class Meter:
    code: str
    name: str
    event_type: str
    aggregation: Aggregation
    property: str | None = None
    unit: str = ""
    # property -> accepted values, compared with the value's text as sent
    filters: dict[str, tuple[str, ...]] = field(default_factory=dict)
    group_by: tuple[str, ...] = ()
    description: str = ""
    source: Literal["config", "api"] = "api"

    def as_json(self) -> dict[str, Any]:
        return {
            "code": self.code,
            "name": self.name,
            "event_type": self.event_type,
            "aggregation": self.aggregation,
            "property": self.property,
            "unit": self.unit,
            "filters": {k: list(v) if len(v) > 1 else v[0] for k, v in self.filters.items()},
            "group_by": list(self.group_by),
            "description": self.description,
            "source": self.source,
        }


def _text(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str | int | float):
        return str(value)
    raise TypeError


def _string(doc: dict[str, Any], name: str, *, required: bool, max_len: int = 255) -> str:
    v = doc.get(name)
    if v is None:
        if required:
            raise MeterError(name, f"`{name}` is required.")
        return ""
    if not isinstance(v, str):
        raise MeterError(name, f"`{name}` must be a string.")
    if required and not v:
        raise MeterError(name, f"`{name}` must not be empty.")
    if len(v) > max_len:
        raise MeterError(name, f"`{name}` is {len(v)} characters; the limit is {max_len}.")
    return v


def parse_meter(doc: Any, source: Literal["config", "api"] = "api", code: str | None = None) -> Meter:
    """Validates a meter definition (a JSON object or a TOML table)."""
    if not isinstance(doc, dict):
        raise MeterError("meter", "A meter must be a JSON object.")
    unknown = sorted(set(doc) - set(FIELDS) - {"source", "version"})
    if unknown:
        raise MeterError(unknown[0], f"`{unknown[0]}` is not a meter field; the fields are {', '.join(FIELDS)}.")
    if code is not None and doc.get("code", code) != code:
        raise MeterError("code", f"`code` is {doc.get('code')!r} but the URL names {code!r}.")
    c = code if code is not None else _string(doc, "code", required=True)
    if not CODE_RE.fullmatch(c):
        raise MeterError("code", f"`code` {c!r} must be 1 to 63 of a-z, 0-9 and '_', starting with a letter.")
    agg = doc.get("aggregation")
    if agg not in AGGREGATIONS:
        raise MeterError("aggregation", f"`aggregation` must be one of {', '.join(AGGREGATIONS)}, got {agg!r}.")
    prop = _string(doc, "property", required=False) or None
    if agg != "COUNT" and prop is None:
        raise MeterError("property", f"`property` is required for {agg}: it names the event property to aggregate.")
    if agg == "COUNT" and prop is not None:
        raise MeterError("property", "`property` must be empty for COUNT, which counts events.")
    raw_filters = doc.get("filters") or {}
    if not isinstance(raw_filters, dict):
        raise MeterError("filters", "`filters` must be an object of property to value or list of values.")
    filters: dict[str, tuple[str, ...]] = {}
    for k, v in raw_filters.items():
        values = v if isinstance(v, list) else [v]
        try:
            texts = tuple(_text(x) for x in values)
        except TypeError:
            raise MeterError(
                f"filters.{k}", f"`filters.{k}` must be a string, number, boolean or a list of them."
            ) from None
        if not k or not texts:
            raise MeterError(f"filters.{k}", f"`filters.{k}` needs a property name and at least one value.")
        filters[k] = texts
    group_by = doc.get("group_by") or []
    if not isinstance(group_by, list) or not all(isinstance(g, str) and 0 < len(g) <= 255 for g in group_by):
        raise MeterError("group_by", "`group_by` must be a list of property names.")
    if len(set(group_by)) != len(group_by):
        raise MeterError("group_by", "`group_by` lists a property twice.")
    return Meter(
        code=c,
        name=_string(doc, "name", required=False) or c,
        event_type=_string(doc, "event_type", required=True, max_len=100),
        aggregation=agg,
        property=prop,
        unit=_string(doc, "unit", required=False),
        filters=filters,
        group_by=tuple(group_by),
        description=_string(doc, "description", required=False, max_len=2000),
        source=source,
    )


# The seed's catalog: what `make run` serves when the config defines no meters.
DEFAULT_METERS: tuple[dict[str, Any], ...] = (
    {"code": "api_calls", "name": "API calls", "event_type": "api_request", "aggregation": "COUNT",
     "unit": "calls", "group_by": ["endpoint", "method", "region"]},
    {"code": "bandwidth", "name": "Bandwidth", "event_type": "api_request", "aggregation": "SUM",
     "property": "bytes", "unit": "bytes", "group_by": ["endpoint", "method", "region"]},
    {"code": "storage_peak", "name": "Peak storage", "event_type": "storage", "aggregation": "MAX",
     "property": "gb_stored", "unit": "GB", "group_by": ["region"]},
    {"code": "compute_time", "name": "Compute time", "event_type": "compute", "aggregation": "SUM",
     "property": "cpu_ms", "unit": "ms", "group_by": ["region", "instance_type"]},
)  # fmt: skip


def configured_meters(settings: Settings) -> tuple[Meter, ...]:
    """The meters of the config's `[[meters]]` tables (the seed's catalog when it has none), each
    checked; a ConfigError names the file, the table and the field."""
    source = settings.config or "config"
    out: list[Meter] = []
    for i, doc in enumerate(DEFAULT_METERS if settings.meters is None else settings.meters):
        try:
            out.append(parse_meter(doc, "config"))
        except MeterError as e:
            raise ConfigError(f"{source}: meters[{i}].{e.field}: {e.message}") from None
        defined_once(source, "meters", [m.code for m in out])
    return tuple(out)
