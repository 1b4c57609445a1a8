"""`make loadtest`'s parts against real services: the driver's HTTP parsing, its counts and the
acknowledged request numbers the storage check relies on, async mode's drain, and a ceiling's CPU."""

from __future__ import annotations

import socket
from collections.abc import Callable

import orjson

from loadtest.drive import ResponseParser, drive
from loadtest.run import drain, redis_ceiling, stored_events, verify
from meterflow import samples
from tests.harness.backends import Backend
from tests.harness.meterflow import ASYNC, TEST_ADMIN_KEY, MeterFlowServer, MeterFlowWorker
from tests.harness.processes import ClickHouse, Redis

OPEN = {"MF_RATE_REQUESTS_PER_S": "100000", "MF_RATE_REQUESTS_BURST": "100000"}


def request(key: str, body: bytes) -> bytes:
    return (f"POST /v1/events HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {key}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n").encode() + body  # fmt: skip


def test_parser_splits_real_responses_however_they_arrive(
    make_backend: Callable[[str], Backend], start_server: Callable[..., MeterFlowServer]
) -> None:
    server = start_server(make_backend("embedded"), **OPEN)
    body = orjson.dumps({"events": samples.batch(3, seed=7, prefix="parse")})
    raw = b""
    with socket.create_connection(("127.0.0.1", server.port), 10) as s:
        s.settimeout(10)
        reader = ResponseParser()
        # Two requests on one keep-alive connection: accepted, then refused (unknown key).
        for n, key in enumerate((TEST_ADMIN_KEY, "mf_nosuchkey")):
            s.sendall(request(key, body))
            got: list[tuple[int, bytes]] = []
            while len(got) < 1:
                chunk = s.recv(65536)
                assert chunk, f"connection closed before response {n}"
                raw += chunk
                got += reader.feed(chunk)
    expected = ResponseParser().feed(raw)  # both responses in one read
    assert [status for status, _ in expected] == [200, 401]
    assert orjson.loads(expected[0][1])["accepted"] == 3
    assert "error" in orjson.loads(expected[1][1])
    one_byte = ResponseParser()
    pieces = [r for i in range(len(raw)) for r in one_byte.feed(raw[i : i + 1])]
    assert pieces == expected
    assert one_byte.buf == b""


async def test_acknowledged_requests_are_the_stored_ones(
    make_backend: Callable[[str], Backend], start_server: Callable[..., MeterFlowServer],
    clickhouse: ClickHouse,
) -> None:  # fmt: skip
    backend = make_backend("full")
    server = start_server(backend, **OPEN)
    database = backend.env["MF_CLICKHOUSE_DATABASE"]
    closed = await drive(server.url, TEST_ADMIN_KEY, 10, 4, 1.0, run="dclosed")
    assert closed["errors"] == 0 and closed["requests"] > 0
    assert closed["accepted"] == closed["requests"] * 10
    assert sorted(closed["acked"]) == list(range(closed["requests"]))
    # Open loop at 40 requests/s for 1 s: requests 0..39 are due, whatever the answers.
    opened = await drive(server.url, TEST_ADMIN_KEY, 10, 4, 1.0, rate=40, run="dopen")
    assert opened["requests"] == 40 and sorted(opened["acked"]) == list(range(40))
    assert verify(clickhouse, database, "events", [closed, opened]) == "OK"
    # The check sees a request the driver did not acknowledge.
    missing = {**opened, "acked": opened["acked"][1:]}
    assert verify(clickhouse, database, "events", [missing]).startswith("FAILED")


async def test_refused_requests_are_errors_not_acknowledgements(
    make_backend: Callable[[str], Backend], start_server: Callable[..., MeterFlowServer]
) -> None:
    server = start_server(make_backend("embedded"), **OPEN)
    result = await drive(server.url, "mf_nosuchkey", 5, 2, 0.5, rate=20, run="drefused")
    assert result["requests"] == 10
    assert result["errors"] == 10 and result["statuses"] == {"401": 10}
    assert result["accepted"] == 0 and result["acked"] == []


async def test_async_mode_is_checked_once_the_workers_have_stored_it(
    make_backend: Callable[[str], Backend], start_server: Callable[..., MeterFlowServer],
    start_worker: Callable[..., MeterFlowWorker], clickhouse: ClickHouse,
) -> None:  # fmt: skip
    backend = make_backend("full")
    server = start_server(backend, **ASYNC, **OPEN)
    database = backend.env["MF_CLICKHOUSE_DATABASE"]
    queued = await drive(server.url, TEST_ADMIN_KEY, 10, 4, 0.5, rate=20, run="dasync")
    assert queued["requests"] == 10 and len(queued["acked"]) == 10
    assert stored_events(clickhouse, database, "events", ["dasync"]) == 0  # no worker yet: answered, not stored
    start_worker(backend)
    drain(clickhouse, database, "events", [queued], timeout=60)
    assert stored_events(clickhouse, database, "events", ["dasync"]) == 100
    assert verify(clickhouse, database, "events", [queued]) == "OK"


def test_a_ceiling_counts_the_services_own_cpu(redis_server: Redis) -> None:
    ceiling = redis_ceiling(redis_server, n=100_000)
    assert ceiling is not None, "redis-benchmark (Debian's redis-tools) is missing"
    assert ceiling.units == 100_000 and ceiling.rate > 0
    assert ceiling.cpu_s > 0 and ceiling.us_per_unit == ceiling.cpu_s / 100_000 * 1e6
