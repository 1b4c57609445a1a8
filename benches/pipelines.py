"""The best pure-Python pipelines we could write for the Rust core's job.

Each takes the request body and produces what the core produces: the valid
events' storage rows (JSONEachRow, the cheapest format to make in Python,
with the same typed property columns: every value as text, numbers also as
exact decimals, left for ClickHouse to parse from the number's JSON text),
the archive lines (NDJSON), the per-event failures (index, transaction_id,
reason) and the number of in-batch duplicates, applying every rule of
DESIGN §4. The benches compare the core against them; `test_pipelines_agree`
keeps them honest.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Annotated, Any, Literal

import msgspec
import orjson
import pydantic

from meterflow._core import decode_batch

ID_RE = re.compile(r"[A-Za-z0-9_-]{1,255}")
MAX_FUTURE_MS = 300_000
MAX_AGE_MS = 30 * 86_400_000
FIELDS = ("transaction_id", "customer_id", "event_type", "timestamp", "properties")

Result = tuple[int, list[tuple[int, str | None, str]], bytes, bytes, int]


def _same_content(
    a: tuple[str, int, dict[str, Any]], b: tuple[str, int, dict[str, Any]], dumps: Callable[[Any], bytes]
) -> bool:
    """Same event type, timestamp and properties (as sent, in any key order)."""
    return a[:2] == b[:2] and {k: dumps(v) for k, v in a[2].items()} == {k: dumps(v) for k, v in b[2].items()}


def _finish(
    valid: list[tuple[int, str, str, str, int, dict[str, Any]]],
    failed: list[tuple[int, str | None, str]],
    now_ms: int,
    dumps: Callable[[Any], bytes],
    raw: Callable[[bytes], Any],
) -> Result:
    """Business rules shared by the three pipelines, then the two encodings."""
    # (customer_id, transaction_id) -> the first event's content.
    seen: dict[tuple[str, str], tuple[str, int, dict[str, Any]]] = {}
    dups = 0
    rows: list[bytes] = []
    lines: list[bytes] = []
    lo, hi = now_ms - MAX_AGE_MS, now_ms + MAX_FUTURE_MS
    for index, tid, cid, etype, ts, props in valid:
        if ts > hi:
            failed.append((index, tid, "timestamp_in_future"))
            continue
        if ts < lo:
            failed.append((index, tid, "timestamp_too_old"))
            continue
        first = seen.get((cid, tid))
        if first is not None:
            if _same_content(first, (etype, ts, props), dumps):
                dups += 1
            else:
                failed.append((index, tid, "idempotency_conflict"))
            continue
        pjson = dumps(props)
        num_keys: list[str] = []
        num_values: list[Any] = []
        str_keys: list[str] = []
        str_values: list[str] = []
        for k, v in props.items():
            str_keys.append(k)
            if v is True or v is False:
                str_values.append("true" if v else "false")
            elif isinstance(v, str):
                str_values.append(v)
            else:
                text = dumps(v)
                str_values.append(text.decode())
                num_keys.append(k)
                num_values.append(raw(text))  # the exact text, for Decimal128(9)
        if any(abs(v) >= 10**24 for v in props.values() if not isinstance(v, str | bool)):
            failed.append((index, tid, "property_out_of_range"))
            continue
        seen[(cid, tid)] = (etype, ts, props)
        rows.append(
            dumps(
                {
                    "transaction_id": tid,
                    "customer_id": cid,
                    "event_type": etype,
                    "timestamp_ms": ts,
                    "ts": ts // 1000,
                    "properties": pjson.decode(),
                    "num_keys": num_keys,
                    "num_values": num_values,
                    "str_keys": str_keys,
                    "str_values": str_values,
                }
            )
        )
        lines.append(
            dumps(
                {
                    "transaction_id": tid,
                    "customer_id": cid,
                    "event_type": etype,
                    "timestamp": ts,
                    "properties": props,
                }
            )
        )
    failed.sort()
    nl = b"\n"
    return len(rows), failed, nl.join(rows) + nl, nl.join(lines) + nl, dups


# --- orjson with hand-written checks -------------------------------------------


def _check_props(props: Any) -> str | None:
    if not isinstance(props, dict):
        return "wrong_type:properties"
    if len(props) > 100:
        return "too_many_properties"
    for k, v in props.items():
        if not 1 <= len(k) <= 255:
            return "invalid_property_key"
        if isinstance(v, str):
            if len(v) > 1000:
                return "property_value_too_long"
        elif not isinstance(v, int | float | bool):
            return f"wrong_type:properties.{k}"
    return None


def orjson_pipeline(body: bytes, now_ms: int) -> Result:
    doc = orjson.loads(body)
    events = doc["events"]
    valid = []
    failed: list[tuple[int, str | None, str]] = []
    for i, e in enumerate(events):
        if not isinstance(e, dict):
            failed.append((i, None, "wrong_type:event"))
            continue
        tid = e.get("transaction_id")
        tid_s = tid if isinstance(tid, str) else None
        reason = None
        for k in e:
            if k not in FIELDS:
                reason = f"unknown_field:{k}"
                break
        if reason is None:
            for name in ("transaction_id", "customer_id"):
                v = e.get(name)
                if v is None:
                    reason = f"missing_field:{name}"
                elif not isinstance(v, str):
                    reason = f"wrong_type:{name}"
                elif not ID_RE.fullmatch(v):
                    reason = f"invalid_{name}"
                if reason:
                    break
        if reason is None:
            et = e.get("event_type")
            if et is None:
                reason = "missing_field:event_type"
            elif not isinstance(et, str):
                reason = "wrong_type:event_type"
            elif not 1 <= len(et) <= 100:
                reason = "invalid_event_type"
        if reason is None:
            ts = e.get("timestamp")
            if ts is None:
                reason = "missing_field:timestamp"
            elif type(ts) is not int:
                reason = "wrong_type:timestamp"
        if reason is None:
            reason = _check_props(e.get("properties", {}))
        if reason is not None:
            failed.append((i, tid_s, reason))
            continue
        valid.append((i, tid, e["customer_id"], e["event_type"], e["timestamp"], e.get("properties", {})))
    return _finish(valid, failed, now_ms, orjson.dumps, orjson.Fragment)


# --- msgspec Structs with constraints ------------------------------------------

MsId = Annotated[str, msgspec.Meta(min_length=1, max_length=255, pattern=r"^[A-Za-z0-9_-]+$")]
MsValue = Annotated[str, msgspec.Meta(max_length=1000)] | int | float | bool
MsKey = Annotated[str, msgspec.Meta(min_length=1, max_length=255)]


class MsEvent(msgspec.Struct, forbid_unknown_fields=True):
    transaction_id: MsId
    customer_id: MsId
    event_type: Annotated[str, msgspec.Meta(min_length=1, max_length=100)]
    timestamp: int
    properties: Annotated[dict[MsKey, MsValue], msgspec.Meta(max_length=100)] = {}


class MsBatch(msgspec.Struct):
    events: list[MsEvent]


_ms_batch = msgspec.json.Decoder(MsBatch)
_ms_raw = msgspec.json.Decoder(dict[str, list[msgspec.Raw]])
_ms_event = msgspec.json.Decoder(MsEvent)
_ms_any = msgspec.json.Decoder()
_ms_enc = msgspec.json.Encoder()


def _ms_reason(raw: msgspec.Raw) -> tuple[str | None, str]:
    """Why one event failed msgspec validation, as the core's reason code."""
    e = _ms_any.decode(raw)
    if not isinstance(e, dict):
        return None, "wrong_type:event"
    tid = e.get("transaction_id")
    tid_s = tid if isinstance(tid, str) else None
    # msgspec's message names the path; map it onto the shared reason codes.
    try:
        _ms_event.decode(raw)
    except msgspec.ValidationError as exc:
        msg = str(exc)
        m = re.search(r"at `\$\.(\w+)", msg)
        field = m.group(1) if m else ""
        if "Object contains unknown field" in msg:
            return tid_s, "unknown_field:" + msg.split("`")[1]
        if "missing required field" in msg:
            return tid_s, "missing_field:" + msg.split("`")[1]
        if field in ("transaction_id", "customer_id"):
            return tid_s, ("wrong_type:" if "Expected `str`, got" in msg else "invalid_") + field
        if field == "event_type":
            return tid_s, "wrong_type:event_type" if "Expected `str`, got" in msg else "invalid_event_type"
        if field == "timestamp":
            return tid_s, "wrong_type:timestamp"
        if field == "properties":
            return tid_s, _check_props(e.get("properties")) or "wrong_type:properties"
        return tid_s, "invalid_event"
    raise AssertionError("event validated on its own")


def msgspec_pipeline(body: bytes, now_ms: int) -> Result:
    failed: list[tuple[int, str | None, str]] = []
    try:
        events = list(enumerate(_ms_batch.decode(body).events))
    except msgspec.ValidationError:
        # Slow path: one bad event must not fail the batch.
        events = []
        for i, raw in enumerate(_ms_raw.decode(body)["events"]):
            try:
                events.append((i, _ms_event.decode(raw)))
            except msgspec.ValidationError:
                tid, reason = _ms_reason(raw)
                failed.append((i, tid, reason))
    valid = [
        (i, e.transaction_id, e.customer_id, e.event_type, e.timestamp, e.properties) for i, e in events
    ]
    return _finish(valid, failed, now_ms, _ms_enc.encode, msgspec.Raw)


# --- pydantic v2 -----------------------------------------------------------------

PdId = Annotated[str, pydantic.StringConstraints(min_length=1, max_length=255, pattern=r"^[A-Za-z0-9_-]+$")]
PdValue = Annotated[str, pydantic.StringConstraints(max_length=1000)] | int | float | bool


class PdEvent(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(extra="forbid", strict=True)
    transaction_id: PdId
    customer_id: PdId
    event_type: Annotated[str, pydantic.StringConstraints(min_length=1, max_length=100)]
    timestamp: int
    properties: Annotated[dict[Annotated[str, pydantic.StringConstraints(min_length=1, max_length=255)], PdValue], pydantic.Field(max_length=100)] = {}


_pd_events = pydantic.TypeAdapter(dict[Literal["events"], list[PdEvent]])


def pydantic_pipeline(body: bytes, now_ms: int) -> Result:
    failed: list[tuple[int, str | None, str]] = []
    try:
        events = list(enumerate(_pd_events.validate_json(body)["events"]))
    except pydantic.ValidationError:
        events = []
        for i, raw in enumerate(orjson.loads(body)["events"]):
            try:
                events.append((i, PdEvent.model_validate(raw)))
            except pydantic.ValidationError as exc:
                err = exc.errors()[0]
                loc = err["loc"]
                field = str(loc[0]) if loc else ""
                tid = raw.get("transaction_id") if isinstance(raw, dict) else None
                tid_s = tid if isinstance(tid, str) else None
                if err["type"] == "model_type":
                    reason = "wrong_type:event"
                elif err["type"] == "extra_forbidden":
                    reason = f"unknown_field:{field}"
                elif err["type"] == "missing":
                    reason = f"missing_field:{field}"
                elif field == "properties":
                    reason = _check_props(raw.get("properties")) or "wrong_type:properties"
                elif err["type"].endswith("_type") or field == "timestamp":
                    reason = f"wrong_type:{field}"
                else:
                    reason = f"invalid_{field}"
                failed.append((i, tid_s, reason))
    valid = [
        (i, e.transaction_id, e.customer_id, e.event_type, e.timestamp, e.properties) for i, e in events
    ]
    return _finish(valid, failed, now_ms, orjson.dumps, orjson.Fragment)


# --- the Rust core ------------------------------------------------------------------


def core_pipeline(body: bytes, now_ms: int) -> Result:
    b = decode_batch(body, now_ms)
    return len(b), b.failed, b.storage_rows(), b.archive_lines(), b.in_batch_duplicates


PIPELINES: dict[str, Callable[[bytes, int], Result]] = {
    "core": core_pipeline,
    "msgspec": msgspec_pipeline,
    "pydantic": pydantic_pipeline,
    "orjson": orjson_pipeline,
}
