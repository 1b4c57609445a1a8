"""Precise answers to a client's mistakes: a 4xx naming the parameter, never a 500 or the store's own text."""

from __future__ import annotations

import json
import os
import socket
import stat
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from zoneinfo import ZoneInfo

import httpx
import pytest
import sqlalchemy as sa
from sqlalchemy.exc import DBAPIError
from starlette.requests import Request

from meterflow import config
from meterflow.app import bootstrap_admin_key
from meterflow.auth.keys import KeyStore
from meterflow.kernel.calendar import known_zones
from meterflow.kernel.params import EPOCH_MS_MAX
from meterflow.metering.windows import Window, bucket_sql
from meterflow.records import Records, open_records
from meterflow.records.tables import api_keys
from meterflow.runtime import started
from meterflow.storage import Storage
from meterflow.web import errors
from tests.harness.backends import Backend
from tests.harness.meterflow import MeterFlowServer

LIST_ROUTES = ["/v1/customers", "/v1/keys", "/v1/meters"]
USAGE = {"customer_id": "c", "meter": "api_calls", "start": "1", "end": "2"}
LONG = "a" * 20_000  # past ClickHouse's URL limit (18.16) if it ever reached a query


def assert_no_traceback(server: MeterFlowServer) -> None:
    assert "Traceback" not in server.logs()
    assert "internal_error" not in server.logs()


@pytest.mark.parametrize("route", LIST_ROUTES)
def test_limit_that_is_not_an_ascii_integer_is_400(server: MeterFlowServer, route: str) -> None:
    for limit in ["²", "\u0661\u0660", "1_0", " 5", "+5", "5.0", "9" * 40]:
        r = httpx.get(f"{server.url}{route}", params={"limit": limit}, headers=server.auth)
        assert r.status_code == 400, (limit, r.text)
        assert r.json()["error"] == "invalid_parameter" and "`limit`" in r.json()["message"]
    assert httpx.get(f"{server.url}{route}", params={"limit": "5"}, headers=server.auth).status_code == 200
    assert_no_traceback(server)


DAY = 86_400_000


@pytest.mark.parametrize(
    ("param", "start", "end"),
    [
        ("start", "\u00b2", "2"),
        ("start", "\u0661", "2"),
        ("start", "-1", str(DAY - 1)),  # before 1970
        ("start", str(-62135596800000 - DAY), str(-62135596800000)),  # before year 1
        ("end", str(EPOCH_MS_MAX - DAY), str(EPOCH_MS_MAX + 1)),  # after 9999-01-01
        ("start", "253402300800000", str(253402300800000 + DAY)),  # year 10000
        ("start", "9" * 30, "9" * 31),  # past Int64
    ],
)
def test_usage_instant_outside_the_calendar_is_400(server: MeterFlowServer, param: str, start: str, end: str) -> None:
    for window in (None, "HOUR", "DAY", "MONTH"):
        extra = {"window": window, "tz": "Pacific/Kiritimati"} if window else {}
        r = httpx.get(f"{server.url}/v1/usage", params={**USAGE, "start": start, "end": end, **extra},
                      headers=server.auth)  # fmt: skip
        assert r.status_code == 400, r.text
        assert r.json()["error"] == "invalid_parameter" and f"`{param}`" in r.json()["message"]
    assert_no_traceback(server)


def test_usage_at_the_edges_of_the_calendar_answers(server: MeterFlowServer) -> None:
    """The last month before the bound, in the zones furthest from UTC, on both engines."""
    for tz in ("Pacific/Kiritimati", "Etc/GMT+12"):
        for window, start, end in [("MONTH", EPOCH_MS_MAX - 40 * 86_400_000, EPOCH_MS_MAX), ("DAY", 0, 86_400_000)]:
            params = {**USAGE, "start": str(start), "end": str(end), "window": window, "tz": tz}
            r = httpx.get(f"{server.url}/v1/usage", params=params, headers=server.auth)
            assert r.status_code == 200, r.text
            assert r.json()["value"] == 0 and r.json()["series"][-1]["end"] == end
    assert_no_traceback(server)


def test_client_mistakes_never_reach_the_store(server: MeterFlowServer) -> None:
    """Inputs no stored thing can match are answered before any SQL, never as the store's error."""
    h = server.auth
    answers = {
        "cursor": httpx.get(f"{server.url}/v1/customers", params={"cursor": LONG}, headers=h),
        "cursor'": httpx.get(f"{server.url}/v1/meters", params={"cursor": "x' OR 1"}, headers=h),
        "name": httpx.get(f"{server.url}/v1/customers", params={"name": LONG}, headers=h),
        "email": httpx.get(f"{server.url}/v1/customers", params={"email": LONG}, headers=h),
        "meter": httpx.get(f"{server.url}/v1/usage", params={**USAGE, "meter": LONG}, headers=h),
        "code": httpx.get(f"{server.url}/v1/meters/{LONG}", headers=h),
        "delete code": httpx.delete(f"{server.url}/v1/meters/{LONG}", headers=h),
        "key_id": httpx.delete(f"{server.url}/v1/keys/{LONG}", headers=h),
    }
    expected = {"cursor": 400, "cursor'": 400, "name": 400, "email": 400, "meter": 400, "code": 404,
                "delete code": 404, "key_id": 404}  # fmt: skip
    assert {k: r.status_code for k, r in answers.items()} == expected, {k: r.text[:200] for k, r in answers.items()}
    for what, r in answers.items():
        assert set(r.json()) == {"error", "message"}
        assert "ClickHouse" not in r.text and "chdb" not in r.text, what
    assert_no_traceback(server)


@pytest.mark.parametrize("customer_id", ["not an id!", "", "a" * 256, "cust/1", 7])
def test_key_bound_to_an_invalid_customer_id_is_400(server: MeterFlowServer, customer_id: object) -> None:
    r = httpx.post(f"{server.url}/v1/keys", json={"scope": "ingest", "customer_id": customer_id}, headers=server.auth)
    assert r.status_code == 400, r.text
    assert r.json()["error"] == "invalid_key" and "customer_id" in r.json()["message"]
    assert httpx.get(f"{server.url}/v1/keys", headers=server.auth).json()["data"] == []


def chunked_request(server: MeterFlowServer, method: str, path: str) -> bytes:
    head = (f"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            f"Authorization: {server.auth['Authorization']}\r\nTransfer-Encoding: chunked\r\n\r\n")  # fmt: skip
    return head.encode()


@pytest.mark.parametrize(("method", "path"), [("PUT", "/v1/customers/cust_big"), ("POST", "/v1/meters"),
                                              ("POST", "/v1/keys")])  # fmt: skip
def test_admin_body_is_refused_at_the_limit_while_it_streams(server: MeterFlowServer, method: str, path: str) -> None:
    """1.1 MiB of a body of unknown length (the limit is 1 MiB), then the client goes quiet:
    the answer is 413 at once. A server that buffers the whole body first waits for the end."""
    chunk = b"1," * (32 * 1024)
    deadline = time.monotonic() + 20
    with socket.create_connection(("127.0.0.1", server.port), timeout=20) as s:
        s.sendall(chunked_request(server, method, path))
        for _ in range(18):
            s.sendall(f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n")
        answer = b""
        while b"\r\n\r\n" not in answer and time.monotonic() < deadline:
            part = s.recv(4096)
            if not part:
                break
            answer += part
    assert answer.startswith(b"HTTP/1.1 413"), answer[:200]


async def test_admin_key_and_data_dir_are_private_from_creation(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With chmod made a no-op, only a file and a directory created with their final modes pass:
    no moment exists where the admin key is readable by others."""
    monkeypatch.setattr(Path, "chmod", lambda self, mode: None)
    monkeypatch.setattr("os.chmod", lambda *a, **k: None)
    data = tmp_path / "fresh" / "data"
    # The records live outside the data directory, so bootstrap_admin_key is what creates it.
    records = open_records(config.Settings(database_url=f"sqlite:///{tmp_path / 'records.db'}"))
    old = os.umask(0o022)
    try:
        async with started(records):
            await bootstrap_admin_key(config.Settings(data_dir=str(data)), KeyStore(records))
    finally:
        os.umask(old)
    assert stat.S_IMODE(data.stat().st_mode) == 0o700
    key = data / "admin.key"
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    assert key.read_text().startswith("mf_")


def test_first_start_data_dir_is_0700(make_backend: Callable[[str], Backend],
                                      start_server: Callable[..., MeterFlowServer]) -> None:  # fmt: skip
    backend = make_backend("embedded")
    start_server(backend, MF_ADMIN_KEY="")
    assert backend.data_dir is not None
    assert stat.S_IMODE(backend.data_dir.stat().st_mode) == 0o700
    assert stat.S_IMODE((backend.data_dir / "admin.key").stat().st_mode) == 0o600


def test_the_largest_valid_customer_is_stored(server: MeterFlowServer) -> None:
    """The largest customer the rules allow is stored and read back, never refused by the store."""
    metadata = {"k" * 97 + f"{i:03d}": "v" * 1000 for i in range(100)}  # 100 keys of 100, values of 1000
    r = httpx.put(f"{server.url}/v1/customers/cust_big", json={"name": "B" * 500, "metadata": metadata},
                  headers=server.auth, timeout=60)  # fmt: skip
    assert r.status_code == 201, r.text[:300]
    got = httpx.get(f"{server.url}/v1/customers/cust_big", headers=server.auth, timeout=60).json()
    assert got["metadata"] == metadata


def test_null_timezone_in_a_patch_is_400(server: MeterFlowServer) -> None:
    url = f"{server.url}/v1/customers/cust_tz"
    assert httpx.put(url, json={"name": "A", "timezone": "Europe/Paris"}, headers=server.auth).status_code == 201
    r = httpx.patch(url, json={"timezone": None}, headers=server.auth)
    assert r.status_code == 400, r.text
    assert r.json()["error"] == "invalid_customer" and "`timezone`" in r.json()["message"]
    assert httpx.get(url, headers=server.auth).json()["timezone"] == "Europe/Paris"
    assert_no_traceback(server)


def test_nul_character_is_refused_in_every_text_field(server: MeterFlowServer) -> None:
    """PostgreSQL's text cannot hold U+0000: refused as a 400 naming the field, on both engines alike."""
    url = f"{server.url}/v1/customers/cust_nul"
    h = server.auth
    assert httpx.put(url, json={"name": "A"}, headers=h).status_code == 201
    bodies = {"name": {"name": "a\u0000b"}, "email": {"email": "a\u0000@b.example"},
              "metadata": {"metadata": {"k\u0000": "v"}}, "metadata'": {"metadata": {"k": "v\u0000"}}}  # fmt: skip
    for field, body in bodies.items():
        for r in (httpx.put(url, json=body, headers=h), httpx.patch(url, json=body, headers=h)):
            assert r.status_code == 400, (field, r.text)
            assert f"`{field.rstrip(chr(39))}`" in r.json()["message"], r.text
    for field in ("name", "email"):
        r = httpx.get(f"{server.url}/v1/customers", params={field: "a\u0000"}, headers=h)
        assert r.status_code == 400 and r.json()["error"] == "invalid_parameter", r.text
        assert f"`{field}`" in r.json()["message"]
    r = httpx.post(f"{server.url}/v1/keys", json={"scope": "read", "name": "k\u0000"}, headers=h)
    assert r.status_code == 400 and "`name`" in r.json()["message"], r.text
    assert httpx.get(url, headers=h).json()["name"] == "A"
    assert_no_traceback(server)


def test_if_match_outside_the_version_range_matches_nothing(server: MeterFlowServer) -> None:
    """A tag no version can have is stale (412) on every conditional route, never an overflow in SQL."""
    url = f"{server.url}/v1/customers/cust_tag"
    assert httpx.put(url, json={"name": "A"}, headers=server.auth).status_code == 201
    meter = {"code": "seats", "event_type": "seat", "aggregation": "MAX", "property": "n"}
    assert httpx.post(f"{server.url}/v1/meters", json=meter, headers=server.auth).status_code == 201
    key = httpx.post(f"{server.url}/v1/keys", json={"scope": "read"}, headers=server.auth).json()
    for tag in ['"99999999999999999999"', '"9223372036854775808"', '"2147483648"', '"0"', '"\u00b2"']:
        headers = [(k.encode(), v.encode()) for k, v in {**server.auth, "If-Match": tag}.items()]
        with httpx.Client(headers=headers) as c:
            answers = [
                c.put(url, json={"name": "B"}),
                c.patch(url, json={"name": "B"}),
                c.delete(url),
                c.put(f"{server.url}/v1/meters/seats", json=meter),
                c.delete(f"{server.url}/v1/meters/seats"),
                c.delete(f"{server.url}/v1/keys/{key['id']}"),
            ]
        assert [r.status_code for r in answers] == [412] * 6, (tag, [r.text[:200] for r in answers])
    assert httpx.get(url, headers=server.auth).json()["version"] == 1
    assert_no_traceback(server)


def test_time_zone_the_store_cannot_compute_in_is_400(server: MeterFlowServer) -> None:
    """Python's zoneinfo loads `right/UTC`, ClickHouse does not: a client's mistake, never a 503."""
    for tz in ["right/UTC", "posix/UTC", "localtime", "Nowhere/City", "../etc/passwd"]:
        r = httpx.get(f"{server.url}/v1/usage", params={**USAGE, "tz": tz, "window": "DAY"}, headers=server.auth)
        assert r.status_code == 400, (tz, r.text)
        assert r.json()["error"] == "invalid_parameter" and "`tz`" in r.json()["message"]
        c = httpx.put(f"{server.url}/v1/customers/cust_zone", json={"timezone": tz}, headers=server.auth)
        assert c.status_code == 400 and "`timezone`" in c.json()["message"], (tz, c.text)
    r = httpx.get(f"{server.url}/v1/usage", params={**USAGE, "tz": "Europe/Paris", "window": "DAY"},
                  headers=server.auth)  # fmt: skip
    assert r.status_code == 200, r.text
    assert_no_traceback(server)


async def test_every_accepted_time_zone_computes_windows_in_the_store(storage: Storage) -> None:
    """Each zone the API accepts runs in a window query on chdb and on ClickHouse 18.16 (one statement)."""
    zones = sorted(known_zones())
    assert "UTC" in zones and "Europe/Paris" in zones and not {"right/UTC", "posix/UTC", "localtime"} & set(zones)
    windows: tuple[Window, ...] = ("DAY", "MONTH")
    for window in windows:
        columns = ", ".join(f"{bucket_sql(window, ZoneInfo(z), 0)} AS c{i}" for i, z in enumerate(zones))
        rows = await storage.query(f"SELECT {columns} FROM (SELECT toInt64(86400000) AS t)")
        assert len(rows) == 1 and len(rows[0]) == len(zones)


async def test_a_value_or_constraint_the_database_refuses_is_a_4xx(records: Records) -> None:
    """The last guard behind the routes' checks: the database's own refusal maps to 409 / 400, never 500."""
    request = Request({"type": "http", "method": "PUT", "path": "/v1/x", "query_string": b"", "headers": []})
    row: dict[str, object] = {"id": "k" * 12, "name": "", "scope": "read", "customer_id": None, "rate_limits": {}, "hash": "h",
           "created_at": 0, "version": 1}  # fmt: skip
    async with records.begin() as conn:
        await conn.execute(sa.insert(api_keys).values(row))
    with pytest.raises(DBAPIError) as dup:
        async with records.begin() as conn:
            await conn.execute(sa.insert(api_keys).values({**row, "id": "j" * 12}))  # the same hash
    answer = await errors.record_rejected(request, dup.value)
    assert answer.status_code == 409 and json.loads(bytes(answer.body))["error"] == "conflict"
    if records.name == "postgresql":  # SQLite's text holds U+0000; PostgreSQL's cannot
        with pytest.raises(DBAPIError) as nul:
            async with records.begin() as conn:
                await conn.execute(sa.insert(api_keys).values({**row, "id": "n" * 12, "hash": "n", "name": "\x00"}))
        answer = await errors.record_rejected(request, nul.value)
        assert answer.status_code == 400 and json.loads(bytes(answer.body))["error"] == "invalid_value"


@pytest.mark.parametrize("command", [["db", "upgrade"], ["keys", "create", "--scope", "read"]])
def test_cli_first_run_creates_the_data_dir_0700(tmp_path: Path, command: list[str]) -> None:
    """The CLI's first touch of a fresh data directory is the records database: it too creates it private."""
    data = tmp_path / "fresh" / "data"
    env = {k: v for k, v in os.environ.items() if not k.startswith("MF_")} | {"MF_DATA_DIR": str(data)}
    old = os.umask(0o022)  # the child inherits it: a plain mkdir would make 0755
    try:
        out = subprocess.run([sys.executable, "-m", "meterflow.cli", *command], env=env, capture_output=True,
                             text=True, timeout=120)  # fmt: skip
    finally:
        os.umask(old)
    assert out.returncode == 0, out.stderr
    assert stat.S_IMODE(data.stat().st_mode) == 0o700
