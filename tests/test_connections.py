"""Connections that send nothing, or stall, cannot stop the server answering everyone else."""

from __future__ import annotations

import resource
import selectors
import socket
import time
from collections.abc import Callable, Iterator

import httpx
import pytest
from services import Backend, MeterFlowServer

from meterflow import samples

IDLE = 5000


@pytest.fixture
def many_fds() -> Iterator[None]:
    """This test process opens thousands of sockets: its own soft limit goes to the hard one."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < IDLE + 512:
        pytest.skip(f"the hard open-file limit ({hard}) is below {IDLE + 512}")
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    yield
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def open_idle(port: int, n: int) -> list[socket.socket]:
    out: list[socket.socket] = []
    try:
        for _ in range(n):
            s = socket.create_connection(("127.0.0.1", port), timeout=10)
            s.setblocking(False)
            out.append(s)
    except OSError:
        for s in out:
            s.close()
        raise
    return out


def wait_closed_by_peer(socks: list[socket.socket], timeout: float) -> int:
    """Waits until the server closed every socket (EOF or reset); returns how many it closed."""
    sel = selectors.DefaultSelector()
    for s in socks:
        sel.register(s, selectors.EVENT_READ)
    open_ = len(socks)
    deadline = time.monotonic() + timeout
    while open_ and time.monotonic() < deadline:
        for key, _ in sel.select(timeout=0.5):
            s = key.fileobj
            assert isinstance(s, socket.socket)
            try:
                data = s.recv(65536)
            except (ConnectionResetError, BrokenPipeError):
                data = b""
            if not data:
                sel.unregister(s)
                open_ -= 1
    sel.close()
    return len(socks) - open_


def test_idle_connections_do_not_stop_answers(
    many_fds: None, make_backend: Callable[[str], Backend], start_server: Callable[..., MeterFlowServer]
) -> None:
    server = start_server(make_backend("embedded"))
    idle = open_idle(server.port, IDLE)
    try:
        health = httpx.get(f"{server.url}/health", timeout=1)
        assert health.status_code == 200
        r = httpx.post(f"{server.url}/v1/events", content=samples.body(samples.batch(10, seed=7)),
                       headers={"Content-Type": "application/json", **server.auth}, timeout=10)  # fmt: skip
        assert r.status_code == 200 and r.json()["accepted"] == 10, r.text
    finally:
        for s in idle:
            s.close()


def test_slow_headers_and_idle_keep_alive_are_closed(
    make_backend: Callable[[str], Backend], start_server: Callable[..., MeterFlowServer]
) -> None:
    server = start_server(make_backend("embedded"), MF_HTTP_HEADER_TIMEOUT_S="2")
    socks = []
    for _ in range(20):  # half a request header, then nothing: a slow client
        s = socket.create_connection(("127.0.0.1", server.port), timeout=10)
        s.sendall(b"POST /v1/events HTTP/1.1\r\nHost: x\r\n")
        socks.append(s)
    for _ in range(20):  # one request, then idle on keep-alive
        s = socket.create_connection(("127.0.0.1", server.port), timeout=10)
        s.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        assert s.recv(65536).startswith(b"HTTP/1.1 200")
        socks.append(s)
    for s in socks:
        s.setblocking(False)
    try:
        assert wait_closed_by_peer(socks, timeout=60) == len(socks)
    finally:
        for s in socks:
            s.close()


def test_a_stalled_body_times_out(
    make_backend: Callable[[str], Backend], start_server: Callable[..., MeterFlowServer]
) -> None:
    server = start_server(make_backend("embedded"), MF_HTTP_BODY_TIMEOUT_S="2")
    auth = server.auth["Authorization"]
    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as s:
        s.sendall(f"POST /v1/events HTTP/1.1\r\nHost: x\r\nAuthorization: {auth}\r\n"
                  "Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n{\"events\": [".encode())  # fmt: skip
        answer = b""
        while b"\r\n\r\n" not in answer or b"}" not in answer.split(b"\r\n\r\n", 1)[1]:
            chunk = s.recv(65536)  # the socket's 30 s timeout is the deadline
            if not chunk:
                break
            answer += chunk
    assert answer.startswith(b"HTTP/1.1 408"), answer[:200]
    assert b'"body_timeout"' in answer
