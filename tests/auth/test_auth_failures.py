"""Failed authentication slows the failing address or key id, never a valid key; unknown keys never grow a cache."""

from __future__ import annotations

import re
import secrets
from collections.abc import Callable

import httpx
import pytest
from redis.exceptions import RedisError

from meterflow import samples
from meterflow.auth import keys as keys_module
from meterflow.auth.failures import AuthFailures
from meterflow.auth.keys import KeyStore
from meterflow.records import Records
from meterflow.runtime import started
from tests.harness.backends import Backend
from tests.harness.http import post
from tests.harness.meterflow import MeterFlowServer
from tests.harness.processes import Redis, free_port

LIMIT = 5


def random_key() -> str:
    return "mf_" + "".join(secrets.choice(keys_module.ALPHABET) for _ in range(44))


def client(address: str) -> httpx.Client:
    """A client whose connections come from `address` (any 127.0.0.0/8 address is local on Linux)."""
    return httpx.Client(transport=httpx.HTTPTransport(local_address=address), timeout=30)


def post_seed(c: httpx.Client, server: MeterFlowServer, key: str, headers: dict[str, str] | None = None) -> httpx.Response:
    """The seed event from `c`'s address with `key` (and `headers`)."""
    return post(c, f"{server.url}/v1/events", samples.body([samples.seed_event()]),
                auth={"Authorization": f"Bearer {key}"}, headers=headers)  # fmt: skip


def admin_key(server: MeterFlowServer) -> str:
    return server.auth["Authorization"].removeprefix("Bearer ")


def test_an_address_that_guesses_keys_waits_but_its_valid_keys_do_not(
    backend: Backend, start_server: Callable[..., MeterFlowServer]
) -> None:
    server = start_server(backend, MF_AUTH_FAILURES_PER_MINUTE=str(LIMIT))
    with client("127.0.0.7") as guesser, client("127.0.0.8") as other:
        for _ in range(LIMIT):
            r = post_seed(guesser, server, random_key())
            assert (r.status_code, r.json()["error"]) == (401, "invalid_api_key")
        over = post_seed(guesser, server, random_key())
        assert (over.status_code, over.json()["error"]) == (429, "too_many_auth_failures"), over.text
        assert 1 <= int(over.headers["Retry-After"]) <= 60
        assert str(LIMIT) in over.json()["message"] and "address" in over.json()["message"]
        # A valid key from the same address is never refused: the key is checked first.
        assert post_seed(guesser, server, admin_key(server)).status_code == 200
        assert post_seed(guesser, server, random_key()).status_code == 429
        # Other addresses and keyless routes go on.
        assert post_seed(other, server, admin_key(server)).status_code == 200
        assert post_seed(other, server, random_key()).status_code == 401
        assert guesser.get(f"{server.url}/health").status_code == 200


def test_25_bad_keys_from_an_address_then_a_valid_key_from_it_is_served(
    backend: Backend, start_server: Callable[..., MeterFlowServer]
) -> None:
    """The default limit (20 a minute): a NAT, a proxy, or a device still sending a revoked key."""
    server = start_server(backend)
    with client("127.0.0.9") as shared:
        revoked = httpx.post(f"{server.url}/v1/keys", json={"scope": "ingest"}, headers=server.auth).json()
        assert httpx.delete(f"{server.url}/v1/keys/{revoked['id']}", headers=server.auth).status_code == 204
        bad = [post_seed(shared, server, revoked["key"] if i % 2 else random_key()).status_code for i in range(25)]
        assert bad[:20] == [401] * 20 and bad[20:] == [429] * 5, bad
        valid = post_seed(shared, server, admin_key(server))
        assert valid.status_code == 200, valid.text
        signed_in = shared.post(f"{server.url}/v1/keys", json={"scope": "read"}, headers=server.auth)
        assert signed_in.status_code == 201, signed_in.text


def test_wrong_secrets_for_a_key_id_slow_that_id_not_its_holder_nor_the_addresses(
    backend: Backend, start_server: Callable[..., MeterFlowServer]
) -> None:
    server = start_server(backend, MF_AUTH_FAILURES_PER_MINUTE=str(LIMIT))
    key = httpx.post(f"{server.url}/v1/keys", json={"scope": "ingest"}, headers=server.auth).json()
    wrong = key["key"][:15] + "".join(secrets.choice(keys_module.ALPHABET) for _ in range(32))
    assert wrong[:15] == "mf_" + key["id"] and wrong != key["key"]
    # Spread over addresses: the count is the key id's, not an address's.
    codes = []
    for i in range(LIMIT + 1):
        with client(f"127.0.1.{i + 1}") as c:
            codes.append(post_seed(c, server, wrong))
    assert [r.status_code for r in codes] == [401] * LIMIT + [429]
    assert key["id"] in codes[-1].json()["message"] and "Retry-After" in codes[-1].headers
    with client(f"127.0.1.{LIMIT + 1}") as last:
        # The holder of the key goes on, from the very address that sent the last wrong secret,
        assert post_seed(last, server, key["key"]).status_code == 200
        # and that address's own count is untouched: an unknown key is a plain 401.
        assert post_seed(last, server, random_key()).status_code == 401
    # Another key id is not slowed.
    with client("127.0.1.99") as other:
        assert post_seed(other, server, admin_key(server)[:15] + "0" * 32).status_code == 401


def test_the_address_comes_from_the_trusted_proxy_header(
    make_backend: Callable[[str], Backend], start_server: Callable[..., MeterFlowServer]
) -> None:
    server = start_server(make_backend("embedded"), MF_AUTH_FAILURES_PER_MINUTE=str(LIMIT),
                          MF_CLIENT_ADDRESS_HEADER="x-real-ip")  # fmt: skip
    with httpx.Client(timeout=30) as c:
        def send(ip: str, key: str) -> int:
            return post_seed(c, server, key, {"X-Real-IP": ip}).status_code

        assert [send("203.0.113.9", random_key()) for _ in range(LIMIT + 1)] == [401] * LIMIT + [429]
        assert send("198.51.100.4", random_key()) == 401


async def test_unknown_keys_do_not_grow_the_cache(records: Records, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(keys_module, "MISSES_MAX", 100)
    store = KeyStore(records)
    for _ in range(300):
        assert await store.authenticate(random_key()) is None
    assert len(store._misses) == 100 and len(store._cache) == 0


async def test_active_keys_stay_cached_through_a_flood_of_unknown_keys(
    records: Records, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A flood of unknown keys evicts no active key; among active keys the least recently used goes first."""
    monkeypatch.setattr(keys_module, "CACHE_MAX", 3)
    monkeypatch.setattr(keys_module, "MISSES_MAX", 10)
    store = KeyStore(records)
    made = [await store.create("read", f"k{i}") for i in range(4)]
    busy, other, third, fourth = ((key["id"], secret) for key, secret in made)
    for _, secret in (busy, other, third):
        assert await store.authenticate(secret) is not None
    for _ in range(50):
        assert await store.authenticate(random_key()) is None
    assert list(store._cache) == [busy[0], other[0], third[0]]
    assert await store.authenticate(busy[1]) is not None  # used again: now the most recent
    assert await store.authenticate(fourth[1]) is not None  # one more active key drops the least recent
    assert list(store._cache) == [third[0], busy[0], fourth[0]]


async def test_the_shared_count_is_a_backend_ready_probes(redis_server: Redis) -> None:
    shared = AuthFailures(LIMIT, redis_server.url)
    async with started(shared):
        await shared.ping()
    gone = AuthFailures(LIMIT, f"redis://127.0.0.1:{free_port()}")
    async with started(gone):
        with pytest.raises((RedisError, OSError)):
            await gone.ping()
        # Redis away: the worker's own count stands in, the limit still holds.
        assert [await gone.failed("192.0.2.1") for _ in range(LIMIT)] == [None] * LIMIT
        assert await gone.failed("192.0.2.1") is not None


def test_ready_reports_the_failure_count_backend(server: MeterFlowServer, backend: Backend) -> None:
    checks = httpx.get(f"{server.url}/ready").json()["checks"]
    name = "redis" if backend.kind == "full" else "memory"
    assert checks[f"authfailures:{name}"] == {"status": "ok"}


def test_the_dashboard_signs_in_a_valid_key_after_bad_keys_from_its_address(
    make_backend: Callable[[str], Backend], start_server: Callable[..., MeterFlowServer]
) -> None:
    server = start_server(make_backend("embedded"), MF_AUTH_FAILURES_PER_MINUTE=str(LIMIT))
    with client("127.0.0.10") as c:
        def sign_in(key: str) -> int:
            form = c.get(f"{server.url}/dashboard/signin")  # each form carries a token of its own
            token = re.search(r'name="csrf" value="([^"]+)"', form.text)
            assert token, form.text
            return c.post(f"{server.url}/dashboard/signin", data={"csrf": token.group(1), "key": key}).status_code

        assert [sign_in(random_key()) for _ in range(LIMIT + 1)] == [401] * LIMIT + [429]
        assert sign_in(admin_key(server)) == 303
