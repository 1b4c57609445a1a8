"""The records database: versions and compare-and-set, constraints, migrations, on SQLite and PostgreSQL;
ETag/If-Match over HTTP, two workers, the upgrade from the documents table, a PostgreSQL outage."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy.exc import IntegrityError

from meterflow import samples
from meterflow.auth.keys import KeyStore, digest, new_key, split_key
from meterflow.config import ConfigError, Settings, load
from meterflow.customers import Customers, validate
from meterflow.metering.catalog import MeterCatalog
from meterflow.metering.meters import parse_meter
from meterflow.records import IfMatch, Records, StaleVersion, migrate, open_records
from meterflow.records.database import database_url
from meterflow.records.legacy import LegacyImportFailed, import_documents
from meterflow.records.tables import api_keys, legacy_imports, metadata
from meterflow.records.tables import customers as customer_rows
from meterflow.runtime import started
from meterflow.storage.embedded import EmbeddedStorage
from tests.harness.backends import Backend
from tests.harness.http import JSON, post_events
from tests.harness.meterflow import MeterFlowServer
from tests.harness.processes import PostgreSQL


def fields(**doc: Any) -> dict[str, Any]:
    return validate(doc)


# --- the data layer, on both engines ---------------------------------------------------------


async def test_every_change_raises_the_version_and_a_stale_one_is_refused(records: Records) -> None:
    customers = Customers(records)
    created, was_new = await customers.put("cust_1", fields(name="Acme"))
    assert was_new and created["version"] == 1
    patched = await customers.patch("cust_1", {"email": "a@acme.io"}, IfMatch.parse('"1"'))
    assert patched is not None and patched["version"] == 2 and patched["name"] == "Acme"
    with pytest.raises(StaleVersion):
        await customers.patch("cust_1", {"name": "Old"}, IfMatch.parse('"1"'))
    with pytest.raises(StaleVersion):
        await customers.put("cust_1", fields(name="Old"), IfMatch.parse('W/"1"'))
    with pytest.raises(StaleVersion):
        await customers.delete("cust_1", IfMatch.parse('"1"'))
    assert await customers.delete("cust_1", IfMatch.parse('"2"'))
    assert await customers.get("cust_1") is None
    # If-Match on a record that is gone: no version matches.
    with pytest.raises(StaleVersion):
        await customers.put("cust_1", fields(name="Back"), IfMatch.parse("*"))
    again, was_new = await customers.put("cust_1", fields(name="Back"))
    # A record that comes back keeps counting: an ETag of its earlier life never matches.
    assert was_new and again["version"] == 4 and again["created_at"] >= created["created_at"]


async def test_concurrent_changes_with_one_if_match_let_one_win(records: Records) -> None:
    customers = Customers(records)
    await customers.put("cust_race", fields(name="Start"))

    async def patch(name: str) -> str:
        try:
            await customers.patch("cust_race", {"name": name}, IfMatch.parse('"1"'))
        except StaleVersion:
            return "stale"
        return "ok"

    outcomes = await asyncio.gather(*(patch(f"n{i}") for i in range(8)))
    assert sorted(outcomes) == ["ok"] + ["stale"] * 7
    final = await customers.get("cust_race")
    assert final is not None and final["version"] == 2
    # Without If-Match no change is lost: every one applies, each on the version before it.
    await asyncio.gather(*(customers.patch("cust_race", {"metadata": {f"k{i}": "v"}}) for i in range(8)))
    final = await customers.get("cust_race")
    assert final is not None and final["version"] == 10


async def test_many_concurrent_changes_without_if_match_all_apply(records: Records) -> None:
    """A change without If-Match is never lost or refused, however many run at once: each applies on the
    version before it (the row is locked for the read-modify-write), so the versions are exactly 2..N+1."""
    n = 40
    customers = Customers(records)
    await customers.put("cust_many", fields(name="Start"))
    patched = await asyncio.gather(*(customers.patch("cust_many", {"name": f"n{i}"}) for i in range(n)))
    assert sorted(c["version"] for c in patched if c is not None) == list(range(2, n + 2))
    put = await asyncio.gather(*(customers.put("cust_many", fields(name=f"p{i}")) for i in range(n)))
    assert sorted(c["version"] for c, _ in put) == list(range(n + 2, 2 * n + 2))
    fresh = await asyncio.gather(*(customers.put("cust_new", fields(name=f"c{i}")) for i in range(n)))
    assert sorted(created for _, created in fresh) == [False] * (n - 1) + [True]
    catalog = MeterCatalog(records, ())
    meter = parse_meter({"code": "many", "event_type": "e", "aggregation": "COUNT"}, "api")
    replaced = await asyncio.gather(*(catalog.replace(meter) for _ in range(n)))
    assert sorted(v for _, v in replaced) == list(range(1, n + 1))


async def test_the_database_enforces_unique_and_check_constraints(records: Records) -> None:
    row = {"id": "AAAAAAAAAAAA", "name": "", "scope": "ingest", "customer_id": None, "rate_limits": {},
           "hash": "h" * 64, "created_at": 1, "version": 1}  # fmt: skip
    async with records.begin() as conn:
        await conn.execute(sa.insert(api_keys).values(row))
    for bad in ({**row, "id": "BBBBBBBBBBBB"},  # the same secret hash twice
                {**row, "id": "CCCCCCCCCCCC", "hash": "c" * 64, "scope": "root"},  # no such scope
                {**row, "id": "DDDDDDDDDDDD", "hash": "d" * 64, "scope": "read", "customer_id": "c"}):  # fmt: skip
        with pytest.raises(IntegrityError):
            async with records.begin() as conn:
                await conn.execute(sa.insert(api_keys).values(bad))


async def test_ids_page_in_byte_order_on_both_engines(records: Records) -> None:
    customers = Customers(records)
    ids = ["B", "a", "_x", "Z-1", "z", "0"]
    for cid in ids:
        await customers.put(cid, fields(name=f"Name {cid}"))
    first = await customers.list("", 3)
    rest = await customers.list(first[-1]["id"], 10)
    assert [c["id"] for c in first + rest] == sorted(ids)


async def test_meters_and_keys_carry_versions(records: Records) -> None:
    catalog = MeterCatalog(records, ())
    meter = parse_meter({"code": "tokens", "event_type": "llm", "aggregation": "SUM", "property": "n"})
    assert await catalog.create(meter) == 1
    assert await catalog.replace(meter, IfMatch.parse('"1"')) == (False, 2)
    with pytest.raises(StaleVersion):
        await catalog.delete("tokens", IfMatch.parse('"1"'))
    assert await catalog.delete("tokens", IfMatch.parse('"2"'))
    assert await catalog.replace(meter) == (True, 4)
    keys = KeyStore(records)
    key, _ = await keys.create("read", "k")
    with pytest.raises(StaleVersion):
        await keys.revoke(key["id"], IfMatch.parse('"7"'))
    assert await keys.revoke(key["id"], IfMatch.parse('"1"'))
    assert not await keys.revoke(key["id"])


def test_database_url_and_its_checks(tmp_path: Path) -> None:
    assert str(database_url(Settings(data_dir=str(tmp_path)))) == f"sqlite+aiosqlite:///{tmp_path}/meterflow.db"
    url = database_url(Settings(database_url="postgresql://mf:secret@db:5432/meterflow"))
    assert url.drivername == "postgresql+asyncpg" and url.database == "meterflow"
    with pytest.raises(ConfigError, match="MF_DATABASE_URL"):
        load(env={"MF_WORKERS": "2", "MF_STORAGE": "clickhouse", "MF_DEDUP": "redis"})
    with pytest.raises(ConfigError, match="MF_DATABASE_URL"):
        load(env={"MF_DATABASE_URL": "mysql://x@y/z"})
    two = load(env={"MF_WORKERS": "2", "MF_STORAGE": "clickhouse", "MF_DEDUP": "redis",
                    "MF_DATABASE_URL": "postgresql://mf:hunter2@db/meterflow"})  # fmt: skip
    assert "hunter2" not in str(two.public()) and "mf:***@db/meterflow" in str(two.public())


async def test_the_migrations_build_exactly_the_tables_the_code_uses(records: Records) -> None:
    def diff(conn: sa.Connection) -> list[Any]:
        return list(compare_metadata(MigrationContext.configure(conn), metadata))

    async with records.connect() as conn:
        assert await conn.run_sync(diff) == []


def test_if_match_parsing() -> None:
    assert IfMatch.parse(None) is None
    assert IfMatch.parse("*") == IfMatch(any=True)
    both = IfMatch.parse('"3", W/"4"')
    assert both is not None and both.allows(3) and both.allows(4) and not both.allows(5)
    garbage = IfMatch.parse("3")  # not an entity tag: matches nothing
    assert garbage is not None and not garbage.allows(3)


async def test_sqlite_runs_in_wal_mode_with_foreign_keys(tmp_path: Path) -> None:
    db = open_records(Settings(data_dir=str(tmp_path)))
    async with started(db), db.connect() as conn:
        assert (await conn.execute(sa.text("PRAGMA journal_mode"))).scalar() == "wal"
        assert (await conn.execute(sa.text("PRAGMA foreign_keys"))).scalar() == 1
    assert (tmp_path / "meterflow.db").exists()


def head_revision() -> str:
    """The newest migration's revision, read from the migrations themselves."""
    head = ScriptDirectory.from_config(migrate.config(None)).get_current_head()  # type: ignore[arg-type]
    assert head is not None
    return head


@pytest.mark.parametrize("engine", ["sqlite", "postgresql"])
def test_db_upgrade_command_is_idempotent(engine: str, request: pytest.FixtureRequest, tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MF_")} | {"MF_DATA_DIR": str(tmp_path)}
    if engine == "postgresql":
        pg: PostgreSQL = request.getfixturevalue("postgres")
        env["MF_DATABASE_URL"] = pg.new_database()
    for _ in range(2):
        out = subprocess.run([sys.executable, "-m", "meterflow.cli", "db", "upgrade"], env=env,
                             capture_output=True, text=True, timeout=60)  # fmt: skip
        assert out.returncode == 0, out.stderr
        assert f"at revision {head_revision()}" in out.stdout
    if engine == "sqlite":
        assert (tmp_path / "meterflow.db").exists()


# --- over HTTP ---------------------------------------------------------------------------------


def test_etags_and_if_match_over_http(server: MeterFlowServer) -> None:
    url = f"{server.url}/v1/customers/cust_etag"
    created = httpx.put(url, json={"name": "Acme"}, headers=server.auth)
    assert created.status_code == 201 and created.headers["ETag"] == '"1"'
    got = httpx.get(url, headers=server.auth)
    assert got.headers["ETag"] == '"1"' and got.json()["version"] == 1
    stale = httpx.patch(url, json={"name": "B"}, headers={**server.auth, "If-Match": '"0"'})
    assert stale.status_code == 412 and stale.json()["error"] == "precondition_failed"
    ok = httpx.patch(url, json={"name": "B"}, headers={**server.auth, "If-Match": got.headers["ETag"]})
    assert ok.status_code == 200 and ok.headers["ETag"] == '"2"'
    # A body read back (with its version and times) can be sent again.
    assert httpx.put(url, json=ok.json(), headers={**server.auth, "If-Match": '"2"'}).status_code == 200
    assert httpx.delete(url, headers={**server.auth, "If-Match": '"2"'}).status_code == 412
    assert httpx.delete(url, headers={**server.auth, "If-Match": '"3"'}).status_code == 204
    meter = {"code": "seats", "event_type": "seat", "aggregation": "MAX", "property": "n"}
    made = httpx.post(f"{server.url}/v1/meters", json=meter, headers=server.auth)
    assert made.status_code == 201 and made.headers["ETag"] == '"1"'
    mine = httpx.put(f"{server.url}/v1/meters/seats", json=meter, headers={**server.auth, "If-Match": '"5"'})
    assert mine.status_code == 412
    config_meter = httpx.get(f"{server.url}/v1/meters/api_calls", headers=server.auth)
    assert "ETag" not in config_meter.headers and config_meter.json()["version"] is None
    key = httpx.post(f"{server.url}/v1/keys", json={"scope": "read"}, headers=server.auth).json()
    revoke = f"{server.url}/v1/keys/{key['id']}"
    assert httpx.delete(revoke, headers={**server.auth, "If-Match": '"2"'}).status_code == 412
    assert httpx.delete(revoke, headers={**server.auth, "If-Match": '"1"'}).status_code == 204


@pytest.fixture
def two_workers(
    make_backend: Callable[[str], Backend], start_server: Callable[..., MeterFlowServer]
) -> MeterFlowServer:
    # The revocation test polls with a revoked key: each 401 counts as a failed authentication.
    return start_server(make_backend("full"), MF_WORKERS="2", MF_RATE_REQUESTS_PER_S="100000",
                        MF_RATE_REQUESTS_BURST="100000", MF_AUTH_FAILURES_PER_MINUTE="100000")  # fmt: skip


async def test_two_workers_concurrent_patches_with_one_if_match(two_workers: MeterFlowServer) -> None:
    server = two_workers
    url = f"{server.url}/v1/customers/cust_pair"
    async with httpx.AsyncClient(timeout=30, headers=server.auth) as c:
        for round_ in range(5):
            etag = (await c.put(url, json={"name": f"round {round_}"})).headers["ETag"]
            # Two connections, so the kernel may hand them to different workers.
            async with httpx.AsyncClient(timeout=30, headers=server.auth) as a, \
                    httpx.AsyncClient(timeout=30, headers=server.auth) as b:  # fmt: skip
                ra, rb = await asyncio.gather(
                    a.patch(url, json={"email": "a@x.io"}, headers={"If-Match": etag}),
                    b.patch(url, json={"email": "b@x.io"}, headers={"If-Match": etag}),
                )
            assert sorted([ra.status_code, rb.status_code]) == [200, 412]
            winner = ra if ra.status_code == 200 else rb
            assert (await c.get(url)).json()["email"] == winner.json()["email"]


def test_revocation_reaches_every_worker_within_two_seconds(two_workers: MeterFlowServer) -> None:
    """Both workers serve the key before the revocation and refuse it 2 s after: a keep-alive connection
    stays on the worker that accepted it, and /health names that worker's pid."""
    server = two_workers
    key = httpx.post(f"{server.url}/v1/keys", json={"scope": "read"}, headers=server.auth).json()
    headers = {"Authorization": f"Bearer {key['key']}"}
    on: dict[int, httpx.Client] = {}  # one single-connection client per worker pid
    spare: list[httpx.Client] = []
    deadline = time.monotonic() + 30
    try:
        while len(on) < 2:
            assert time.monotonic() < deadline, f"fresh connections reached only the workers {sorted(on)}"
            c = httpx.Client(base_url=server.url, limits=httpx.Limits(max_connections=1), timeout=10)
            pid = c.get("/health").json()["pid"]
            if pid in on:
                spare.append(c)
            else:
                on[pid] = c
        for c in on.values():  # each worker serves the key (and caches it)
            assert c.get("/v1/meters", headers=headers).status_code == 200
        assert httpx.delete(f"{server.url}/v1/keys/{key['id']}", headers=server.auth).status_code == 204
        bound = time.monotonic() + 2.0
        # Until the bound a worker may still hold the key in its cache (polling keeps the connections open)...
        while time.monotonic() < bound:
            for c in on.values():
                assert c.get("/v1/meters", headers=headers).status_code in (200, 401)
        # ...from 2 s after the revocation on, neither accepts it: each answer comes from the same worker as before.
        for pid, c in on.items():
            assert c.get("/v1/meters", headers=headers).status_code == 401
            assert c.get("/health").json()["pid"] == pid
    finally:
        for c in [*on.values(), *spare]:
            c.close()


# --- upgrade from the documents table of the previous release ---------------------------------

DOCUMENTS_DDL = """CREATE TABLE IF NOT EXISTS documents (kind String, id String, version UInt64, deleted UInt8,
body String) ENGINE = ReplacingMergeTree(version) ORDER BY (kind, id)"""


def quote(value: str) -> str:
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


def previous_release_rows() -> tuple[list[str], dict[str, str]]:
    """INSERTs of documents as the previous release wrote them (storage/documents.py: one row per
    change, newest version wins, deletes flagged), and the secrets of its keys."""
    rows: list[tuple[str, str, int, int, dict[str, Any]]] = []
    v = 1_700_000_000_000_000_000
    acme = {"id": "cust_acme", "name": "Acme", "email": "ap@acme.io", "currency": "EUR",
            "timezone": "Europe/Berlin", "metadata": {"crm": "A-1"}, "created_at": 1000, "updated_at": 1000}  # fmt: skip
    rows += [("customer", "cust_acme", v, 0, {**acme, "name": "Acme old"}), ("customer", "cust_acme", v + 1, 0, acme)]
    gone = {"id": "cust_gone", "name": "Gone", "email": None, "currency": None, "timezone": "UTC", "metadata": {},
            "created_at": 1000, "updated_at": 1000}  # fmt: skip
    rows += [("customer", "cust_gone", v, 0, gone), ("customer", "cust_gone", v + 1, 1, {**gone, "deleted_at": 2000})]
    secrets: dict[str, str] = {}
    for name, scope, revoked in (("live", "ingest", False), ("old", "admin", True)):
        key_id, full, hashed = new_key()
        secrets[name] = full
        doc = {"id": key_id, "name": name, "scope": scope, "customer_id": "cust_acme" if scope == "ingest" else None,
               "rate_limits": {"requests_per_s": 50} if scope == "ingest" else {}, "hash": hashed,
               "created_at": 1000, "last_used_at": None, "revoked_at": None}  # fmt: skip
        rows.append(("api_key", key_id, v, 0, doc))
        if revoked:
            rows.append(("api_key", key_id, v + 1, 1, {**doc, "revoked_at": 3000}))
        else:
            rows.append(("api_key_used", key_id, v, 0, {"id": key_id, "last_used_at": 4000}))
    meter = {"code": "gpu_seconds", "name": "GPU", "event_type": "job", "aggregation": "SUM", "property": "s",
             "unit": "s", "filters": {}, "group_by": [], "description": ""}  # fmt: skip
    rows += [("meter", "gpu_seconds", v, 0, meter), ("meter", "dropped", v, 0, {**meter, "code": "dropped"}),
             ("meter", "dropped", v + 1, 1, {})]  # fmt: skip
    sql = [DOCUMENTS_DDL] + [
        f"INSERT INTO documents (kind, id, version, deleted, body) VALUES ({quote(k)}, {quote(i)}, {ver}, {d}, "
        f"{quote(orjson.dumps(b).decode())})"
        for k, i, ver, d, b in rows
    ]
    return sql, secrets


def write_previous_release(backend: Backend, sql: list[str]) -> None:
    if backend.clickhouse is not None:
        for statement in sql:
            req = urllib.request.Request(f"{backend.clickhouse.url}/?database={backend.database}",
                                         data=statement.encode(), method="POST")  # fmt: skip
            with urllib.request.urlopen(req, timeout=30):
                pass
        return
    data = Path(backend.env["MF_DATA_DIR"])
    data.mkdir(parents=True, exist_ok=True)
    code = "import sys, chdb.session as s\nse = s.Session(sys.argv[1])\nfor q in sys.argv[2:]:\n    se.query(q)\n"
    subprocess.run([sys.executable, "-c", code, str(data / "chdb"), *sql], check=True, capture_output=True,
                   timeout=120)  # fmt: skip


def test_start_on_a_previous_release_keeps_every_record(
    backend: Backend, start_server: Callable[..., MeterFlowServer]
) -> None:
    sql, secrets = previous_release_rows()
    write_previous_release(backend, sql)
    server = start_server(backend)
    imported = [line for line in server.logs().splitlines() if "imported records of the previous release" in line]
    assert len(imported) == 1
    assert {k: orjson.loads(imported[0])[k] for k in ("customers", "api_keys", "meters")} == {
        "customers": 2, "api_keys": 2, "meters": 1}  # fmt: skip
    acme = httpx.get(f"{server.url}/v1/customers/cust_acme", headers=server.auth)
    assert acme.status_code == 200
    assert {k: acme.json()[k] for k in ("name", "email", "currency", "timezone", "metadata", "created_at")} == {
        "name": "Acme", "email": "ap@acme.io", "currency": "EUR", "timezone": "Europe/Berlin",
        "metadata": {"crm": "A-1"}, "created_at": 1000}  # fmt: skip
    assert httpx.get(f"{server.url}/v1/customers/cust_gone", headers=server.auth).status_code == 404
    # The old ingest key still works, with its binding and limits; the revoked one does not.
    live = {"Authorization": f"Bearer {secrets['live']}"}
    event = {**samples.seed_event(), "customer_id": "cust_acme"}
    posted = post_events(server, [event], auth=live)
    assert posted.status_code == 200 and posted.json()["accepted"] == 1
    old = httpx.get(f"{server.url}/v1/meters", headers={"Authorization": f"Bearer {secrets['old']}"})
    assert old.status_code == 401
    keys = httpx.get(f"{server.url}/v1/keys", headers=server.auth).json()["data"]
    assert [(k["name"], k["customer_id"], k["rate_limits"]) for k in keys] == [
        ("live", "cust_acme", {"requests_per_s": 50})]  # fmt: skip
    assert keys[0]["last_used_at"] is not None
    meters = [m["code"] for m in httpx.get(f"{server.url}/v1/meters", headers=server.auth).json()["data"]]
    assert "gpu_seconds" in meters and "dropped" not in meters
    # Once only: a second start imports nothing, so later changes are not overwritten.
    assert httpx.patch(f"{server.url}/v1/customers/cust_acme", json={"name": "Acme AG"},
                       headers={**server.auth, **JSON}).status_code == 200  # fmt: skip
    server.stop()
    again = start_server(backend)
    assert httpx.get(f"{again.url}/v1/customers/cust_acme", headers=again.auth).json()["name"] == "Acme AG"
    assert again.logs().count("imported records of the previous release") == 0


async def test_an_import_that_collides_fails_the_start_with_a_clear_error(
    records: Records, chdb_storage: EmbeddedStorage
) -> None:
    """A constraint the old rows break is not "another worker imported them": the start stops, nothing is marked."""
    sql, secrets = previous_release_rows()
    await chdb_storage.execute("DROP TABLE IF EXISTS documents")
    try:
        for statement in sql:
            await chdb_storage.execute(statement)
        live = split_key(secrets["live"])
        assert live is not None
        row = {"id": "X" * 12, "name": "same hash", "scope": "read", "customer_id": None, "rate_limits": {},
               "hash": digest(live[1]), "created_at": 0, "version": 1}  # fmt: skip
        async with records.begin() as conn:
            await conn.execute(sa.insert(api_keys).values(row))
        with pytest.raises(LegacyImportFailed, match="previous release's records"):
            await import_documents(chdb_storage, records)
        async with records.connect() as conn:
            assert (await conn.execute(sa.select(sa.func.count()).select_from(legacy_imports))).scalar() == 0
            assert (await conn.execute(sa.select(sa.func.count()).select_from(customer_rows))).scalar() == 0
    finally:
        await chdb_storage.execute("DROP TABLE IF EXISTS documents")


# --- a PostgreSQL outage -----------------------------------------------------------------------


@pytest.fixture
def private_postgres() -> Iterator[PostgreSQL]:
    pg = PostgreSQL()
    pg.start()
    yield pg
    pg.close()


def test_postgres_outage_answers_503_and_cached_keys_keep_ingesting(
    make_backend: Callable[[str], Backend], start_server: Callable[..., MeterFlowServer],
    private_postgres: PostgreSQL,
) -> None:  # fmt: skip
    backend = make_backend("full")
    grace_s = 6
    server = start_server(backend, MF_DATABASE_URL=private_postgres.new_database(),
                          MF_KEY_CACHE_GRACE_S=str(grace_s))  # fmt: skip
    key = httpx.post(f"{server.url}/v1/keys", json={"scope": "ingest"}, headers=server.auth).json()
    ingest = {"Authorization": f"Bearer {key['key']}"}

    def post(seed: int) -> httpx.Response:
        return post_events(server, samples.batch(1, seed=seed), auth=ingest, timeout=5)

    assert post(1).status_code == 200  # the key is now cached
    private_postgres.stop()
    cached_until = time.monotonic() + grace_s
    assert post(2).status_code == 200  # within the grace time: ingestion goes on
    records = httpx.get(f"{server.url}/v1/customers", headers=server.auth)
    assert records.status_code == 503 and records.json()["error"] == "records_unavailable"
    assert int(records.headers["Retry-After"]) >= 1
    ready = httpx.get(f"{server.url}/ready")
    assert ready.status_code == 503 and ready.json()["checks"]["records:postgresql"]["status"] == "down"
    assert ready.json()["checks"]["storage:clickhouse"]["status"] == "ok"
    # Past the grace time the key cannot be checked: 503, never 500.
    statuses = []
    deadline = cached_until + 30
    while time.monotonic() < deadline:
        r = post(3 + len(statuses))
        statuses.append(r.status_code)
        if r.status_code == 503:
            assert r.json()["error"] == "records_unavailable" and "Retry-After" in r.headers
            break
        time.sleep(0.2)
    assert statuses[-1] == 503 and set(statuses) <= {200, 503}
    private_postgres.start()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and post(1000).status_code != 200:
        time.sleep(0.2)
    assert post(1001).status_code == 200 and httpx.get(f"{server.url}/ready").status_code == 200
