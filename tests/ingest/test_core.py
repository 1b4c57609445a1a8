"""The Rust core through its public Python API: rules, envelope errors, fuzzing."""

from __future__ import annotations

import itertools
import re
import threading
import time
from decimal import MAX_EMAX, MIN_EMIN, ROUND_HALF_EVEN, Context, Decimal, localcontext
from typing import Any

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from meterflow import samples
from meterflow._core import DecodeError, DedupIndex, Limits, conflict_fields, decode_batch

NOW = 1_795_000_000_000
ID_RE = re.compile(r"[A-Za-z0-9_-]{1,255}")


def body(*events: Any) -> bytes:
    return orjson.dumps({"events": list(events)})


def good(tid: str = "tx_1", **over: Any) -> dict[str, Any]:
    e = {"transaction_id": tid, "customer_id": "cust_123", "event_type": "api_request",
         "timestamp": NOW, "properties": {"bytes": 2048}}  # fmt: skip
    e.update(over)
    return e


def reasons(b: bytes, **kw: Any) -> list[str]:
    return [r for _, _, r in decode_batch(b, NOW, **kw).failed]


def test_seed_example_decodes_to_one_valid_event() -> None:
    b = decode_batch(body(samples.seed_event(NOW)), NOW)
    assert len(b) == 1
    assert b.transaction_ids == ["tx_001"]
    assert b.failed == []
    line = orjson.loads(b.archive_lines())
    assert line == samples.seed_event(NOW)


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ({"transaction_id": "bad id"}, "invalid_transaction_id"),
        ({"transaction_id": "x" * 256}, "invalid_transaction_id"),
        ({"transaction_id": 7}, "wrong_type:transaction_id"),
        ({"customer_id": "c/1"}, "invalid_customer_id"),
        ({"customer_id": None}, "wrong_type:customer_id"),
        ({"event_type": "e" * 101}, "invalid_event_type"),
        ({"timestamp": NOW + 300_001}, "timestamp_in_future"),
        ({"timestamp": NOW - 30 * 86_400_000 - 1}, "timestamp_too_old"),
        ({"timestamp": float(NOW)}, "wrong_type:timestamp"),
        ({"timestamp": str(NOW)}, "wrong_type:timestamp"),
        ({"timestamp": True}, "wrong_type:timestamp"),
        ({"properties": {"s": "x" * 1001}}, "property_value_too_long"),
        ({"properties": {"n": None}}, "wrong_type:properties.n"),
        ({"properties": {"l": [1]}}, "wrong_type:properties.l"),
        ({"properties": "x"}, "wrong_type:properties"),
        ({"properties": {f"k{i}": i for i in range(101)}}, "too_many_properties"),
        ({"properties": {"": 1}}, "invalid_property_key"),
        ({"other": 1}, "unknown_field:other"),
    ],
)
def test_each_rule_fails_its_event(change: dict[str, Any], reason: str) -> None:
    b = decode_batch(body(good("ok"), good("t2", **change)), NOW)
    assert len(b) == 1
    assert b.failed == [(1, "t2" if "transaction_id" not in change else b.failed[0][1], reason)]
    assert b.failure_messages[0].startswith("events[1]")


@pytest.mark.parametrize("field", ["transaction_id", "customer_id", "event_type", "timestamp"])
def test_missing_field(field: str) -> None:
    e = good()
    del e[field]
    assert reasons(body(e)) == [f"missing_field:{field}"]


def test_limits_are_configurable() -> None:
    strict = Limits(max_events=2, max_future_ms=0, max_age_ms=1000)
    assert reasons(body(good(timestamp=NOW + 1)), limits=strict) == ["timestamp_in_future"]
    assert reasons(body(good(timestamp=NOW - 1001)), limits=strict) == ["timestamp_too_old"]
    with pytest.raises(DecodeError) as e:
        decode_batch(body(good("a"), good("b"), good("c")), NOW, strict)
    assert e.value.args[0] == "too_many_events"
    with pytest.raises(ValueError):
        Limits(max_events=0)


@pytest.mark.parametrize(
    ("raw", "code"),
    [
        (b"", "invalid_json"),
        (b"nope", "invalid_json"),
        (b"\xc3\x28", "invalid_utf8"),
        (b'"events"', "body_not_object"),
        (b'{"event": []}', "events_missing"),
        (b'{"events": 1}', "events_not_array"),
        (b'{"events": []}', "empty_batch"),
        (b'{"events": [], "events": []}', "duplicate_field"),
        (b'{"events": [{}]} trailing', "invalid_json"),
        (b'{"events": [NaN]}', "invalid_json"),
        (b'{"events": ["\\ud800"]}', "invalid_json"),
        (b"[" * 100_000, "invalid_json"),
        (b'{"events":' + b"[" * 100_000, "invalid_json"),
    ],
)
def test_envelope_errors_raise_one_type(raw: bytes, code: str) -> None:
    with pytest.raises(DecodeError) as e:
        decode_batch(raw, NOW)
    assert e.value.args[0] == code
    assert e.value.args[1].endswith(".")


def test_in_batch_duplicate_is_counted_not_failed() -> None:
    b = decode_batch(body(good("a"), good("b"), good("a"), good("a")), NOW)
    assert b.transaction_ids == ["a", "b"]
    assert b.in_batch_duplicates == 2
    assert b.failed == []


def test_same_id_for_two_customers_is_two_events() -> None:
    b = decode_batch(body(good("a"), good("a", customer_id="cust_456")), NOW)
    assert (len(b), b.in_batch_duplicates, b.failed) == (2, 0, [])
    assert b.key(0) != b.key(1) and len(b.key(0)) == 22
    assert b.fingerprint(0) == b.fingerprint(1)


def test_repeat_with_other_content_is_a_conflict() -> None:
    props = {"bytes": 2048, "endpoint": "/x"}
    reordered = {"endpoint": "/x", "bytes": 2048}
    b = decode_batch(
        body(
            good("a", properties=props),
            good("a", properties=reordered),  # same content
            good("a", properties=props, timestamp=NOW - 1),
            good("a", properties={"bytes": 2049, "endpoint": "/x"}, event_type="other"),
        ),
        NOW,
    )
    assert (len(b), b.in_batch_duplicates) == (1, 1)
    assert b.failed == [(2, "a", "idempotency_conflict"), (3, "a", "idempotency_conflict")]
    assert b.failure_messages[0].endswith("of events[0] but differs from it in: timestamp.")
    assert b.failure_messages[1].endswith("differs from it in: event_type, properties.")
    assert conflict_fields(7) == "event_type, timestamp, properties"


def test_bound_customer() -> None:
    b = decode_batch(body(good("a"), good("b", customer_id="other")), NOW, customer_id="cust_123")
    assert b.failed == [(1, "b", "customer_not_allowed")]


def test_keep_mask_drops_rows_without_reparsing() -> None:
    b = decode_batch(body(good("a"), good("b"), good("c")), NOW)
    lines = b.archive_lines(b"\x01\x00\x01").splitlines()
    assert [orjson.loads(x)["transaction_id"] for x in lines] == ["a", "c"]
    assert len(b.storage_rows(b"\x00\x00\x00")) == 0
    with pytest.raises(ValueError):
        b.storage_rows(b"\x01")


def test_hostile_values_are_answered() -> None:
    huge = "x" * 10_000_000
    raw = body(good(properties={"s": huge}), good("b", properties={"n": 0})).replace(b'"n":0', b'"n":' + b"1" * 400)
    b = decode_batch(raw, NOW)
    assert [r for _, _, r in b.failed] == ["property_value_too_long", "property_out_of_range"]
    ok = decode_batch(body(good(properties={"n": 0})).replace(b'"n":0', b'"n":' + b"9" * 24 + b".5e-1"), NOW)
    assert len(ok) == 1  # just under 1e24: kept, with its exact text
    assert b"9" * 24 + b".5e-1" in ok.archive_lines()
    deep = b'{"events":[{"transaction_id":"a","properties":' + b'{"a":' * 70 + b"1" + b"}" * 70 + b"}]}"
    with pytest.raises(DecodeError):
        decode_batch(deep, NOW)
    dup_keys = b'{"events":[{"transaction_id":"a","transaction_id":"b"}]}'
    assert reasons(dup_keys)[0] == "duplicate_field:transaction_id"


def decode_stall(body: bytes, limits: Limits) -> float:
    """The longest pause of a spinning Python thread while another thread decodes `body`,
    as a fraction of the decode's duration (1.0: it never ran during the decode)."""
    stamps: list[float] = []
    span: list[float] = []

    def decode() -> None:
        span.append(time.perf_counter())
        decode_batch(body, NOW, limits)
        span.append(time.perf_counter())

    worker = threading.Thread(target=decode)
    worker.start()
    deadline = time.monotonic() + 60
    while worker.is_alive() and time.monotonic() < deadline:
        stamps.append(time.perf_counter())
    worker.join()
    t0, t1 = span
    inside = [t0, *(s for s in stamps if t0 < s < t1), t1]
    return max(b - a for a, b in itertools.pairwise(inside)) / (t1 - t0)


def test_decode_releases_the_gil() -> None:
    """Python runs in another thread while a long decode is in Rust. Holding the GIL, the decode
    would stop it for the whole call but one switch interval (5 ms of a ~150 ms decode)."""
    limits = Limits(max_events=100_000)
    big = samples.body(samples.batch(1000, ts=NOW) * 100)  # 100,000 events, 23 MB
    stalls = []
    for _ in range(5):  # a busy machine may deschedule the spinner once; it cannot every time
        stalls.append(decode_stall(big, limits))
        if stalls[-1] < 0.5:
            break
    assert min(stalls) < 0.5, f"another thread stalled for {stalls} of each decode"


def test_resp_replies_and_memory_index() -> None:
    b = decode_batch(body(good("a"), good("b")), NOW)
    cmd = b.redis_reserve("dedup:", "f1", 60)
    assert cmd.count(b"*7\r\n$3\r\nSET\r\n") == 2
    assert f"dedup:{b.key(1)}\r\n$19\r\nf1|{b.fingerprint(1)}\r\n".encode() in cmd
    assert b.reserve_replies(b"$-1\r\n") is None
    other = decode_batch(body(good("a"), good("b", timestamp=NOW - 5)), NOW)
    held = f"f0|{other.fingerprint(1)}".encode()
    assert b.reserve_replies(b"$-1\r\n$%d\r\n%s\r\n" % (len(held), held)) == [(1, b"f0", 2)]
    assert b.reserve_replies(b"$-1\r\n$2\r\nf0\r\n") == [(1, b"f0", 0)]  # a value from before fingerprints
    ix = DedupIndex()
    assert ix.reserve(b, 1) == b"\x00\x00"
    assert ix.reserve(b, 2) == b"\x02\x02"
    ix.commit(1, 0)
    assert ix.reserve(b, 3) == b"\x01\x01"
    assert ix.reserve(other, 4) == b"\x01\x12"  # b's timestamp differs: conflict (16 | 2)
    ix.load(decode_batch(body(good("c", customer_id="x")), NOW), 5)
    assert ix.reserve(decode_batch(body(good("c", customer_id="x"), good("c")), NOW), 6) == b"\x01\x00"


# --- fuzzing --------------------------------------------------------------------


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=2000))
def test_arbitrary_bytes_never_crash(raw: bytes) -> None:
    try:
        b = decode_batch(raw, NOW)
    except DecodeError as e:
        assert isinstance(e.args[0], str) and e.args[1]
    else:
        assert len(b) + len(b.failed) + b.in_batch_duplicates == b.received


scalars = st.one_of(
    st.none(), st.booleans(), st.integers(min_value=-(2**63), max_value=2**64 - 1),
    st.floats(allow_nan=False, allow_infinity=False), st.text(max_size=20),
)  # fmt: skip
ids = st.one_of(st.from_regex(ID_RE, fullmatch=True).map(lambda s: s[:40]), scalars)
timestamps = st.one_of(st.integers(NOW - 31 * 86_400_000, NOW + 400_000), scalars)
props = st.one_of(
    st.dictionaries(st.text(max_size=8), st.one_of(scalars, st.text(min_size=990, max_size=1010)), max_size=5),
    scalars,
)
event = st.fixed_dictionaries(
    {},
    optional={"transaction_id": ids, "customer_id": ids, "event_type": st.one_of(st.text(max_size=110), scalars),
              "timestamp": timestamps, "properties": props, "extra": scalars},
)  # fmt: skip


def py_problems(e: Any) -> list[str]:
    """Every rule of DESIGN §4 an event breaks, in plain Python: the fuzzer's oracle."""
    if not isinstance(e, dict):
        return ["wrong_type:event"]
    out = [f"unknown_field:{k}" for k in e if k not in
           ("transaction_id", "customer_id", "event_type", "timestamp", "properties")]  # fmt: skip
    for f in ("transaction_id", "customer_id"):
        if f not in e:
            out.append(f"missing_field:{f}")
        elif not isinstance(e[f], str):
            out.append(f"wrong_type:{f}")
        elif not ID_RE.fullmatch(e[f]):
            out.append(f"invalid_{f}")
    if "event_type" not in e:
        out.append("missing_field:event_type")
    elif not isinstance(e["event_type"], str):
        out.append("wrong_type:event_type")
    elif not 1 <= len(e["event_type"]) <= 100:
        out.append("invalid_event_type")
    ts = e.get("timestamp")
    if "timestamp" not in e:
        out.append("missing_field:timestamp")
    elif type(ts) is not int:
        out.append("wrong_type:timestamp")
    elif ts >= 2**63:
        out.append("invalid_timestamp")
    elif ts > NOW + 300_000:
        out.append("timestamp_in_future")
    elif ts < NOW - 30 * 86_400_000:
        out.append("timestamp_too_old")
    p = e.get("properties", {})
    if not isinstance(p, dict):
        out.append("wrong_type:properties")
    else:
        for k, v in p.items():
            if not 1 <= len(k) <= 255:
                out.append("invalid_property_key")
            elif v is None:
                out.append(f"wrong_type:properties.{k}")
            elif isinstance(v, str) and len(v) > 1000:
                out.append("property_value_too_long")
            elif not isinstance(v, bool | str) and py_decimal9(orjson.dumps(v).decode()) is None:
                out.append("property_out_of_range")  # judged on the text sent, as the core sees it
    return out


def py_decimal9(text: str) -> Decimal | None:
    """The number rule in plain Python: the text's exact value rounded half to
    even to 9 places, None when that is 1e24 or more in magnitude. Zero with
    any exponent is zero; exponents beyond Decimal's range are decided first."""
    mantissa, _, exp_text = text.lower().partition("e")
    exp = int(exp_text or "0")
    m = Decimal(mantissa)
    if m.is_zero():
        return Decimal(0)
    # |m| is in [1e(a), 1e(a+1)): the value's magnitude is decided by a + exp alone
    # when it is far from both ends of the range.
    magnitude = m.adjusted() + exp
    if magnitude >= 24:
        return None
    if magnitude < -10:  # below 1e-10: under half of the last place
        return Decimal(0)
    with localcontext(Context(prec=200, Emax=MAX_EMAX, Emin=MIN_EMIN)):
        v = m.scaleb(exp).quantize(Decimal("1e-9"), rounding=ROUND_HALF_EVEN)
    return None if v.copy_abs() >= 10**24 else v  # copy_abs: abs() would round to 28 digits


@st.composite
def number_texts(draw: st.DrawFn) -> str:
    """Near-valid JSON numbers: digit runs around 24 integer and 9 fraction
    digits, ties, runs of nines, and exponents of up to 25 digits."""
    digit = st.sampled_from("0123456789") | st.just("9") | st.just("5") | st.just("0")
    lengths = st.sampled_from([1, 2, 9, 10, 19, 20, 23, 24, 25, 33, 34, 40]) | st.integers(1, 45)
    int_len = draw(lengths)
    whole = "".join(draw(st.lists(digit, min_size=int_len, max_size=int_len)))
    whole = whole.lstrip("0") or "0"
    text = draw(st.sampled_from(["", "-"])) + whole
    if draw(st.booleans()):
        n = draw(lengths)
        text += "." + "".join(draw(st.lists(digit, min_size=n, max_size=n)))
    if draw(st.booleans()):
        exp = draw(st.integers(0, 40).map(str) | st.from_regex(r"9{1,25}|0{0,2}[1-9][0-9]{0,24}", fullmatch=True))
        text += draw(st.sampled_from(["e", "E"])) + draw(st.sampled_from(["", "+", "-"])) + exp
    return text


@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(number_texts())
def test_number_texts_follow_the_rounding_rule(text: str) -> None:
    raw = body(good()).replace(b'"bytes":2048', b'"bytes":' + text.encode())
    b = decode_batch(raw, NOW)
    expected = py_decimal9(text)
    assert (len(b) == 1) == (expected is not None), (text, b.failed, expected)
    if expected is None:
        assert b.failed[0][2] == "property_out_of_range"
        assert "1e24" in b.failure_messages[0]


@pytest.mark.parametrize(
    ("text", "accepted"),
    [
        ("999999999999999999999999.999999999", True),
        ("999999999999999999999999.9999999994", True),
        ("999999999999999999999999.9999999995", False),  # rounds to 1e24
        ("999999999999999999999999.9999999999", False),
        ("-999999999999999999999999.99999999951", False),
        ("1e24", False),
        ("0e99999999999999999999", True),  # zero with any exponent is zero
        ("-0.0E+99999999999999999999", True),
        ("0e999", True),
        ("1e99999999999999999999", False),
        ("1e-99999999999999999999", True),  # rounds to 0
        ("5e-10", True),
        ("9" * 5000, False),
        ("0." + "9" * 5000, True),
    ],
)
def test_number_limit_is_checked_after_rounding(text: str, accepted: bool) -> None:
    raw = body(good()).replace(b'"bytes":2048', b'"bytes":' + text.encode())
    b = decode_batch(raw, NOW)
    assert len(b) == int(accepted), b.failed
    assert (py_decimal9(text) is not None) == accepted


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.one_of(event, scalars), min_size=1, max_size=20))
def test_near_valid_batches_follow_the_rules(events: list[Any]) -> None:
    """Never accepts what the rules reject, never rejects what they accept."""
    b = decode_batch(orjson.dumps({"events": events}), NOW)
    failed = {i: r for i, _, r in b.failed}
    seen: dict[tuple[str, str], Any] = {}
    dups = 0
    for i, e in enumerate(events):
        problems = py_problems(e)
        if not problems:
            key = (e["customer_id"], e["transaction_id"])
            content = (e["event_type"], e["timestamp"], {k: orjson.dumps(v) for k, v in e.get("properties", {}).items()})
            if key not in seen:
                assert i not in failed, (e, failed.get(i))
                seen[key] = content
            elif seen[key] == content:
                assert i not in failed, (e, failed.get(i))
                dups += 1
            else:
                assert failed.get(i) == "idempotency_conflict", (e, failed.get(i))
        else:
            # The core reports the first problem it meets, in document order.
            assert i in failed, e
            assert failed[i] in problems, (e, failed[i], problems)
    assert b.in_batch_duplicates == dups
    assert len(b) == len(seen)
