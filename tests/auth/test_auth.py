"""API keys, scopes, rate limits and the customers API, against real servers."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from meterflow import samples
from meterflow.auth.ratelimit import MemoryRateLimiter, gcra
from tests.harness.backends import Backend
from tests.harness.http import post_events
from tests.harness.meterflow import MeterFlowServer
from tests.harness.processes import until, wait_for


def create_key(server: MeterFlowServer, **body: Any) -> dict[str, Any]:
    r = httpx.post(f"{server.url}/v1/keys", json=body, headers=server.auth)
    assert r.status_code == 201, r.text
    return dict(r.json())


def bearer(key: dict[str, Any]) -> dict[str, str]:
    return {"Authorization": f"Bearer {key['key']}"}


def test_every_auth_status(server: MeterFlowServer) -> None:
    events = [samples.seed_event()]
    none = post_events(server, events, auth={})
    assert (none.status_code, none.json()["error"]) == (401, "missing_api_key")
    unknown = post_events(server, events, auth={"Authorization": "Bearer mf_" + "A" * 44})
    assert (unknown.status_code, unknown.json()["error"]) == (401, "invalid_api_key")
    garbage = post_events(server, events, auth={"X-API-Key": "not a key"})
    assert garbage.status_code == 401
    read = create_key(server, scope="read", name="dashboard")
    assert read["key"].startswith("mf_") and len(read["key"]) == 47
    denied = post_events(server, events, auth=bearer(read))
    assert (denied.status_code, denied.json()["error"]) == (403, "insufficient_scope")
    ingest = create_key(server, scope="ingest")
    assert post_events(server, events, auth={"X-API-Key": ingest["key"]}).json()["accepted"] == 1
    usage = httpx.get(f"{server.url}/v1/usage", params={"customer_id": "c", "meter": "api_calls", "start": 1, "end": 2},
                      headers=bearer(ingest))  # fmt: skip
    assert usage.status_code == 403
    assert httpx.get(f"{server.url}/v1/keys", headers=bearer(read)).status_code == 403
    # /health and /ready need no key
    assert httpx.get(f"{server.url}/health").status_code == 200
    assert httpx.get(f"{server.url}/ready").status_code == 200


def test_revoked_key_stops_working_within_seconds(server: MeterFlowServer) -> None:
    key = create_key(server, scope="ingest")
    ok = post_events(server, samples.batch(1, seed=1), auth=bearer(key))
    assert ok.status_code == 200
    assert httpx.delete(f"{server.url}/v1/keys/{key['id']}", headers=server.auth).status_code == 204
    refused = lambda: post_events(server, samples.batch(1, seed=2), auth=bearer(key)).status_code == 401  # noqa: E731
    wait_for(refused, "the revoked key refused on every worker", 5)
    listed = httpx.get(f"{server.url}/v1/keys", headers=server.auth).json()["data"]
    assert key["id"] not in [k["id"] for k in listed]
    assert httpx.delete(f"{server.url}/v1/keys/{key['id']}", headers=server.auth).status_code == 404


def test_keys_list_never_shows_secrets_and_tracks_last_use(server: MeterFlowServer) -> None:
    key = create_key(server, scope="ingest", name="billing-sync")
    post_events(server, samples.batch(1, seed=3), auth=bearer(key))
    listed = {k["id"]: k for k in httpx.get(f"{server.url}/v1/keys", headers=server.auth).json()["data"]}
    entry = listed[key["id"]]
    assert "key" not in entry and "hash" not in entry
    assert entry["name"] == "billing-sync" and entry["scope"] == "ingest"
    assert entry["last_used_at"] is not None
    bad = httpx.post(f"{server.url}/v1/keys", json={"scope": "root"}, headers=server.auth)
    assert bad.status_code == 400 and "scope" in bad.json()["message"]


def test_bound_key_fails_foreign_customers_one_by_one(server: MeterFlowServer, backend: Backend) -> None:
    key = create_key(server, scope="ingest", customer_id="cust_123")
    events = samples.batch(4, seed=5)
    events[0]["customer_id"] = events[2]["customer_id"] = "cust_123"
    r = post_events(server, events, auth=bearer(key)).json()
    assert r["accepted"] == 2
    assert [(f["index"], f["reason"]) for f in r["failed"]] == [(1, "customer_not_allowed"), (3, "customer_not_allowed")]
    bad = httpx.post(f"{server.url}/v1/keys", json={"scope": "read", "customer_id": "x"}, headers=server.auth)
    assert bad.status_code == 400
    server.stop()
    assert backend.stored() == (2, 2)


def test_secrets_never_reach_the_logs(server: MeterFlowServer) -> None:
    keys = [create_key(server, scope=s)["key"] for s in ("ingest", "read", "admin")]
    for k in keys:
        post_events(server, samples.batch(2, seed=7), auth={"Authorization": f"Bearer {k}"})
        httpx.get(f"{server.url}/v1/nope", headers={"X-API-Key": k})
    post_events(server, samples.batch(1), auth={"Authorization": "Bearer mf_" + "B" * 44})
    server.stop()
    logs = server.logs()
    assert "ready" in logs  # the log is there and was written
    for k in [*keys, server.auth["Authorization"].split()[1]]:
        assert k not in logs
        assert k[3:] not in logs


# --- rate limits ------------------------------------------------------------------------


async def burst(server: MeterFlowServer, key: dict[str, Any], n: int) -> tuple[list[httpx.Response], float]:
    async with httpx.AsyncClient(timeout=30) as c:
        t0 = time.monotonic()
        rs = await asyncio.gather(*(c.get(f"{server.url}/v1/meters", headers=bearer(key)) for _ in range(n)))
        return list(rs), time.monotonic() - t0


async def check_limit(server: MeterFlowServer) -> None:
    limits = {"requests_per_s": 10, "requests_burst": 10}
    a = create_key(server, scope="read", rate_limits=limits)
    b = create_key(server, scope="read", rate_limits=limits)
    rs, elapsed = await burst(server, a, 50)
    passed = [r for r in rs if r.status_code == 200]
    limited = [r for r in rs if r.status_code == 429]
    assert len(passed) + len(limited) == 50
    # 10 at once; any more only as the bucket refills (10/s) while the burst is sent.
    assert 10 <= len(passed) <= 10 + int(elapsed * 10) + 1
    r = limited[0]
    assert r.json()["error"] == "rate_limited"
    assert int(r.headers["Retry-After"]) >= 1
    assert r.headers["RateLimit-Limit"] == "10"
    assert r.headers["RateLimit-Remaining"] == "0"
    assert 0 <= int(r.headers["RateLimit-Reset"]) <= 2
    assert int(passed[0].headers["RateLimit-Remaining"]) < 10
    # The other key has its own budget.
    other, _ = await burst(server, b, 5)
    assert all(x.status_code == 200 for x in other)


    async def refilled() -> bool:
        # One probe per 0.2 s costs 5/s (nothing when refused) while the bucket refills at 10/s.
        probe, _ = await burst(server, a, 1)
        return probe[0].status_code == 200 and int(probe[0].headers["RateLimit-Remaining"]) >= 5

    await until(refilled, "the bucket of key a refilling", 10, every=0.2)
    again, _ = await burst(server, a, 5)
    assert all(x.status_code == 200 for x in again)


async def test_request_rate_limit(server: MeterFlowServer) -> None:
    await check_limit(server)


async def test_request_rate_limit_with_two_workers(
    make_backend: Callable[[str], Backend], start_server: Callable[..., MeterFlowServer]
) -> None:
    server = start_server(make_backend("full"), MF_WORKERS="2")
    await check_limit(server)


def test_event_rate_limit_refuses_without_a_trace(server: MeterFlowServer, backend: Backend) -> None:
    key = create_key(server, scope="ingest", rate_limits={"events_per_s": 100, "events_burst": 150})
    events = samples.batch(200, seed=9)
    r = post_events(server, events, auth=bearer(key))
    assert r.status_code == 429 and "Retry-After" in r.headers
    assert post_events(server, events[:100], auth=bearer(key)).json()["accepted"] == 100
    r2 = post_events(server, events[100:], auth=bearer(key))
    assert r2.status_code == 429
    server.stop()
    assert backend.stored() == (100, 100)


def test_gcra_arithmetic() -> None:
    tat = 0.0
    verdicts = []
    for _ in range(12):
        v, tat = gcra(tat, 1000.0, rate=10, burst=10, cost=1)
        verdicts.append(v.allowed)
    assert verdicts == [True] * 10 + [False] * 2
    v, _ = gcra(tat, 1100.0, rate=10, burst=10, cost=1)
    assert v.allowed  # one interval later one more passes
    big, _ = gcra(0.0, 0.0, rate=10, burst=10, cost=11)
    assert not big.allowed

    async def memory() -> list[bool]:
        rl = MemoryRateLimiter()
        return [(await rl.check("k", 5, 5)).allowed for _ in range(7)]

    assert asyncio.run(memory()) == [True] * 5 + [False] * 2


# --- customers ------------------------------------------------------------------------------


def test_customer_round_trip(server: MeterFlowServer) -> None:
    url = f"{server.url}/v1/customers"
    doc = {"name": "Acme GmbH", "email": "billing@acme.example", "currency": "EUR",
           "timezone": "Europe/Berlin", "metadata": {"crm_id": "A-17", "plan": "pro"}}  # fmt: skip
    created = httpx.put(f"{url}/cust_acme", json=doc, headers=server.auth)
    assert created.status_code == 201
    got = httpx.get(f"{url}/cust_acme", headers=server.auth).json()
    assert {k: got[k] for k in doc} == doc
    assert got["id"] == "cust_acme" and got["created_at"] == got["updated_at"]
    wait_for(lambda: int(time.time() * 1000) > got["updated_at"], "the clock passing updated_at")
    patched = httpx.patch(f"{url}/cust_acme", json={"email": "ap@acme.example"}, headers=server.auth).json()
    assert patched["email"] == "ap@acme.example" and patched["name"] == "Acme GmbH"
    assert patched["created_at"] == got["created_at"] and patched["updated_at"] > got["updated_at"]
    replaced = httpx.put(f"{url}/cust_acme", json={"name": "Acme"}, headers=server.auth)
    assert replaced.status_code == 200 and replaced.json()["email"] is None
    for bad, field in [({"currency": "euro"}, "currency"), ({"timezone": "Mars/Base"}, "timezone"),
                       ({"email": "nope"}, "email"), ({"metadata": {"a": 1}}, "metadata"), ({"colour": "x"}, "colour")]:  # fmt: skip
        r = httpx.put(f"{url}/cust_bad", json=bad, headers=server.auth)
        assert r.status_code == 400 and field in r.json()["message"]
    assert httpx.delete(f"{url}/cust_acme", headers=server.auth).status_code == 204
    assert httpx.get(f"{url}/cust_acme", headers=server.auth).status_code == 404
    assert httpx.delete(f"{url}/cust_acme", headers=server.auth).status_code == 404
    # Events for unknown customers are still accepted (usage may precede the CRM sync).
    r = post_events(server, [{**samples.seed_event(), "customer_id": "cust_unknown"}], auth=server.auth)
    assert r.json()["accepted"] == 1


async def test_customers_paginate_2500_without_loss_or_repetition(
    backend: Backend, start_server: Callable[..., MeterFlowServer]
) -> None:
    server = start_server(backend, MF_RATE_REQUESTS_PER_S="100000", MF_RATE_REQUESTS_BURST="100000")
    ids = [f"cust_{i:05d}" for i in range(2500)]
    async with httpx.AsyncClient(timeout=60, headers=server.auth) as c:
        sem = asyncio.Semaphore(16)

        async def put(cid: str) -> None:
            async with sem:
                r = await c.put(f"{server.url}/v1/customers/{cid}", json={"name": f"Name {cid}", "email": f"{cid}@x.io"})
                assert r.status_code == 201

        await asyncio.gather(*(put(cid) for cid in ids))
        seen: list[str] = []
        cursor = ""
        for _ in range(len(ids) // 500 + 2):  # bounded: a cursor that never ends fails below
            page = (await c.get(f"{server.url}/v1/customers", params={"limit": 500, "cursor": cursor})).json()
            seen += [x["id"] for x in page["data"]]
            if not page["next_cursor"]:
                break
            cursor = page["next_cursor"]
        assert seen == ids
        found = (await c.get(f"{server.url}/v1/customers", params={"name": "name CUST_0012"})).json()["data"]
        assert [x["id"] for x in found] == [f"cust_0012{i}" for i in range(10)]
        by_mail = (await c.get(f"{server.url}/v1/customers", params={"email": "cust_02499@"})).json()["data"]
        assert [x["id"] for x in by_mail] == ["cust_02499"]


@pytest.mark.parametrize("limit", ["0", "501", "x"])
def test_bad_page_limit(server: MeterFlowServer, limit: str) -> None:
    r = httpx.get(f"{server.url}/v1/customers", params={"limit": limit}, headers=server.auth)
    assert r.status_code == 400 and "limit" in r.json()["message"]


def test_first_start_prints_an_admin_key_that_works(
    make_backend: Callable[[str], Backend], start_server: Callable[..., MeterFlowServer]
) -> None:
    backend = make_backend("embedded")
    server = start_server(backend, MF_ADMIN_KEY="")  # no fixed key: the embedded first start makes one
    saved = (Path(backend.env["MF_DATA_DIR"]) / "admin.key").read_text().strip()
    assert f"admin API key {saved}" in server.logs()
    assert oct((Path(backend.env["MF_DATA_DIR"]) / "admin.key").stat().st_mode)[-3:] == "600"
    r = httpx.get(f"{server.url}/v1/keys", headers={"Authorization": f"Bearer {saved}"})
    assert r.status_code == 200 and [k["scope"] for k in r.json()["data"]] == ["admin"]
    server.stop()
    again = start_server(backend, MF_ADMIN_KEY="")  # not on later starts
    assert "admin API key" not in again.logs()


def test_keys_create_command_bootstraps_a_key(
    make_backend: Callable[[str], Backend], start_server: Callable[..., MeterFlowServer]
) -> None:
    backend = make_backend("full")
    env = {k: v for k, v in os.environ.items() if not k.startswith("MF_")} | backend.env
    out = subprocess.run([sys.executable, "-m", "meterflow.cli", "keys", "create", "--scope", "admin", "--name", "ops"],
                         env=env, capture_output=True, text=True, timeout=60)  # fmt: skip
    assert out.returncode == 0, out.stderr
    key = out.stdout.strip()
    assert key.startswith("mf_") and len(key) == 47
    server = start_server(backend)
    listed = httpx.get(f"{server.url}/v1/keys", headers={"X-API-Key": key})
    assert listed.status_code == 200 and listed.json()["data"][0]["name"] == "ops"
    bad = subprocess.run([sys.executable, "-m", "meterflow.cli", "keys", "create", "--scope", "root"],
                         env=env, capture_output=True, text=True, timeout=60)  # fmt: skip
    assert bad.returncode != 0


async def test_a_late_last_used_write_cannot_undo_a_revocation(records: Any) -> None:
    """The race: a request reads the key, the key is revoked, then the request
    records the key's use. The key must stay revoked."""
    from meterflow.auth import keys as keys_module
    from meterflow.auth.keys import KeyStore

    store = KeyStore(records)
    created, secret = await store.create("ingest", "race")
    read = await store._lookup(created["id"])  # the request's read, before the revocation
    assert read is not None
    assert await store.revoke(created["id"])
    await store._touch(read)  # the late write
    keys_module.CACHE_S = 0.0
    try:
        assert await store.authenticate(secret) is None
    finally:
        keys_module.CACHE_S = 2.0
    assert created["id"] not in [k["id"] for k in await store.list()]
