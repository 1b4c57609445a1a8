"""Dashboard sessions on two workers (full stack): a session lives in the records database, so whatever
ends it (sign-out, revoking its key) ends it on every worker at once, with no cache in between."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator

import httpx
import pytest

from tests.harness.backends import Backend
from tests.harness.meterflow import MeterFlowServer


@pytest.fixture
def two_workers(
    make_backend: Callable[[str], Backend], start_server: Callable[..., MeterFlowServer]
) -> MeterFlowServer:
    return start_server(make_backend("full"), MF_WORKERS="2")


@pytest.fixture
def per_worker(two_workers: MeterFlowServer) -> Iterator[list[httpx.Client]]:
    """One single-connection client per worker: a keep-alive connection stays on the worker that accepted it,
    and /health names that worker's pid."""
    on: dict[int, httpx.Client] = {}
    spare: list[httpx.Client] = []
    deadline = time.monotonic() + 30
    try:
        while len(on) < 2:
            assert time.monotonic() < deadline, f"fresh connections reached only the workers {sorted(on)}"
            c = httpx.Client(base_url=two_workers.url, limits=httpx.Limits(max_connections=1), timeout=10)
            pid = c.get("/health").json()["pid"]
            if pid in on:
                spare.append(c)
            else:
                on[pid] = c
        yield list(on.values())
    finally:
        for c in [*on.values(), *spare]:
            c.close()


def signed_in(c: httpx.Client, key: str) -> str:
    form = c.get("/dashboard/signin")
    token = form.text.split('name="csrf" value="')[1].split('"')[0]
    r = c.post("/dashboard/signin", data={"csrf": token, "key": key})
    assert r.status_code == 303, r.text
    return str(r.cookies["mf_session"])


def test_revoking_the_key_ends_its_sessions_at_once_on_every_worker(
    two_workers: MeterFlowServer, per_worker: list[httpx.Client]
) -> None:
    server = two_workers
    key = httpx.post(f"{server.url}/v1/keys", json={"scope": "read"}, headers=server.auth).json()
    cookie = {"Cookie": f"mf_session={signed_in(per_worker[0], key['key'])}"}
    for c in per_worker:  # the session works on both workers (and each has the key in its 2 s cache)
        assert c.get("/dashboard/meters", headers=cookie).status_code == 200
    assert httpx.delete(f"{server.url}/v1/keys/{key['id']}", headers=server.auth).status_code == 204
    for c in per_worker:  # at once, not within the key cache's 2 s
        r = c.get("/dashboard/meters", headers=cookie)
        assert (r.status_code, r.headers.get("location")) == (303, "/dashboard/signin?why=revoked")


def test_signing_out_on_one_worker_ends_the_session_on_the_other(
    two_workers: MeterFlowServer, per_worker: list[httpx.Client]
) -> None:
    key = MeterFlowServer.auth["Authorization"].removeprefix("Bearer ")
    a, b = per_worker
    cookie = {"Cookie": f"mf_session={signed_in(a, key)}"}
    page = b.get("/dashboard/keys", headers=cookie)
    assert page.status_code == 200
    csrf = page.text.split('name="csrf" value="')[1].split('"')[0]
    assert a.post("/dashboard/signout", data={"csrf": csrf}, headers=cookie).status_code == 303
    made = b.post("/dashboard/keys", data={"csrf": csrf, "scope": "admin"}, headers=cookie)
    assert (made.status_code, made.headers.get("location")) == (303, "/dashboard/signin")
