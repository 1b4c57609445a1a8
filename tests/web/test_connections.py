"""Connections that send nothing, or stall, cannot stop the server answering everyone else."""

from __future__ import annotations

import resource
import selectors
import shutil
import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from meterflow import samples
from meterflow.cli import FD_RESERVE, connection_cap
from meterflow.config import ConfigError, Settings
from tests.harness.backends import Backend
from tests.harness.http import JSON
from tests.harness.meterflow import MeterFlowServer
from tests.harness.processes import ROOT, Process, free_port, wait_for

IDLE = 5000


@pytest.fixture
def many_fds() -> Iterator[None]:
    """This test process opens thousands of sockets: its own soft limit goes to the hard one."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    # The acceptance is 5,000 idle connections: a machine that cannot open them fails, never skips.
    assert hard == resource.RLIM_INFINITY or hard >= IDLE + 512, (
        f"the hard open-file limit ({hard}) is below {IDLE + 512}"
    )
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
            sock = key.fileobj
            assert isinstance(sock, socket.socket)
            try:
                data = sock.recv(65536)
            except (ConnectionResetError, BrokenPipeError):
                data = b""
            if not data:
                sel.unregister(sock)
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
                       headers={**JSON, **server.auth}, timeout=10)  # fmt: skip
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


@pytest.fixture
def nginx(tmp_path: Path) -> Iterator[Callable[[int], str]]:
    """deploy/nginx.conf, as docker-compose.yml runs it, in front of a server on a port."""
    binary = shutil.which("nginx") or ("/usr/sbin/nginx" if Path("/usr/sbin/nginx").exists() else None)
    assert binary is not None, "nginx is not installed: `make services` installs it (apt-get install nginx)"
    procs: list[Process] = []

    def start(upstream_port: int) -> str:
        port = free_port()
        d = tmp_path / f"nginx-{port}"
        d.mkdir()
        conf = (ROOT / "deploy/nginx.conf").read_text()
        conf = conf.replace("server app:3000;", f"server 127.0.0.1:{upstream_port};")
        conf = conf.replace("listen 8080;", f"listen 127.0.0.1:{port};")
        conf = conf.replace("http {", f"http {{\n    access_log off;\n    client_body_temp_path {d}/body;\n"
                                      f"    proxy_temp_path {d}/proxy;", 1)  # fmt: skip
        assert str(upstream_port) in conf and str(port) in conf
        (d / "nginx.conf").write_text(conf)
        proc = Process([binary, "-p", str(d), "-c", str(d / "nginx.conf"),
                        "-g", f"daemon off; pid {d}/nginx.pid; error_log {d}/error.log;"], d / "stdout.log")  # fmt: skip
        proc.start()
        procs.append(proc)
        url = f"http://127.0.0.1:{port}"
        wait_for(lambda: httpx.get(f"{url}/health", timeout=1).status_code == 200, "nginx", 30)
        return url

    yield start
    for p in procs:
        p.stop()


def test_the_documented_proxy_closes_silent_connections_and_passes_the_client_address(
    nginx: Callable[[int], str],
    make_backend: Callable[[str], Backend],
    start_server: Callable[..., MeterFlowServer],
) -> None:
    server = start_server(make_backend("embedded"), MF_CLIENT_ADDRESS_HEADER="x-real-ip",
                          MF_AUTH_FAILURES_PER_MINUTE="3")  # fmt: skip
    url = nginx(server.port)
    port = int(url.rsplit(":", 1)[1])
    silent = open_idle(port, 200)
    try:
        assert wait_closed_by_peer(silent, timeout=60) == len(silent)  # client_header_timeout 5s
    finally:
        for s in silent:
            s.close()
    with (
        httpx.Client(transport=httpx.HTTPTransport(local_address="127.0.0.9"), timeout=30) as guesser,
        httpx.Client(transport=httpx.HTTPTransport(local_address="127.0.0.10"), timeout=30) as other,
    ):
        bad = {"Authorization": "Bearer mf_" + "B" * 44}
        assert [guesser.get(f"{url}/v1/meters", headers=bad).status_code for _ in range(4)] == [401] * 3 + [429]
        # The proxy's own address is not what is limited: another client goes on.
        assert other.get(f"{url}/v1/meters", headers=bad).status_code == 401
        assert other.get(f"{url}/v1/meters", headers=server.auth).status_code == 200


def test_connection_settings_are_checked_at_start() -> None:
    with pytest.raises(ConfigError, match="MF_HTTP_HEADER_TIMEOUT_S"):
        Settings(http_header_timeout_s=61)  # Granian takes at most 60 s
    with pytest.raises(ConfigError, match="MF_HTTP_BODY_TIMEOUT_S"):
        Settings(http_body_timeout_s=0)
    # The cap per worker follows the open-file limit, so an accept never fails for a descriptor.
    assert connection_cap(Settings(), 1 << 20) == Settings().http_max_connections
    assert (
        connection_cap(
            Settings(workers=2, storage="clickhouse", dedup="redis", database_url="postgresql://mf@127.0.0.1/mf"), 9216
        )
        == (9216 - FD_RESERVE) // 2
    )
