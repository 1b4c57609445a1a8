"""The dedup suite every backend passes: the in-process index and Redis."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest
from redis.exceptions import RedisError

from meterflow import samples
from meterflow.config import Settings
from meterflow.ingest.dedup import (
    FLUSH_PREFIX,
    KEY_PREFIX,
    QUEUED_PREFIX,
    Dedup,
    DedupUnavailable,
    RedisDedup,
    Reservation,
    open_dedup,
)
from meterflow.ingest.service import IngestResult, IngestService, Unavailable, hour_runs
from meterflow.ingest.stream import STREAM, STREAM_BYTES, EventStream
from meterflow.kernel.flush_ids import new_flush_id
from meterflow.kernel.rust import Batch, decode_batch
from meterflow.metrics import Metrics
from meterflow.redis import Multiplexed
from meterflow.storage.embedded import EmbeddedStorage
from tests.harness.processes import Redis, flush_redis, free_port, until

NOW = samples.now_ms()


@pytest.fixture(params=["memory", "redis"])
async def dedup(request: pytest.FixtureRequest) -> AsyncIterator[Dedup]:
    if request.param == "redis":
        redis: Redis = request.getfixturevalue("redis_server")
        flush_redis(redis)
        d = open_dedup(Settings(dedup="redis", redis_url=redis.url, flush_timeout_s=2))
    else:
        d = open_dedup(Settings(dedup="memory"))
    await d.start()
    yield d
    await d.close()


def batch(n: int, seed: int = 1) -> Batch:
    return decode_batch(samples.body(samples.batch(n, seed=seed, ts=NOW)), NOW)


def flush() -> str:
    return new_flush_id()


async def started_redis_dedup(redis: Redis, **settings: Any) -> RedisDedup:
    """A started `RedisDedup` on an emptied Redis (`settings` as `Settings`' own)."""
    flush_redis(redis)
    d = RedisDedup(Settings(dedup="redis", redis_url=redis.url, **settings))
    await d.start()
    return d


async def test_new_ids_are_reserved_then_duplicates_after_commit(dedup: Dedup) -> None:
    b = batch(1000)
    f = flush()
    r = await dedup.reserve(b, f)
    assert (r.accepted, r.duplicates, r.in_flight, r.keep) == (1000, 0, [], None)
    await dedup.commit(f)
    again = await dedup.reserve(b, flush())
    assert (again.accepted, again.duplicates) == (0, 1000)
    assert again.keep == bytes(1000)


async def test_uncommitted_ids_are_in_flight(dedup: Dedup) -> None:
    b = batch(10)
    await dedup.reserve(b, flush())
    r = await dedup.reserve(b, flush())
    assert (r.accepted, r.duplicates, r.in_flight) == (0, 0, list(range(10)))


async def test_released_ids_can_be_reserved_again(dedup: Dedup) -> None:
    b = batch(10)
    f = flush()
    await dedup.reserve(b, f)
    await dedup.release(f, [b.key(i) for i in range(len(b))])
    r = await dedup.reserve(b, flush())
    assert r.accepted == 10


async def test_mixed_batch_keeps_only_new_ids(dedup: Dedup) -> None:
    old = batch(5, seed=9)
    f = flush()
    await dedup.reserve(old, f)
    await dedup.commit(f)
    events = samples.batch(5, seed=9, ts=NOW) + samples.batch(5, seed=10, ts=NOW)
    b = decode_batch(samples.body(events), NOW)
    r = await dedup.reserve(b, flush())
    assert (r.accepted, r.duplicates) == (5, 5)
    assert r.keep == b"\x00" * 5 + b"\x01" * 5


def events_of(customer: str, ids: list[str], ts: int = NOW, **props: object) -> Batch:
    return decode_batch(
        samples.body(
            [
                {"transaction_id": t, "customer_id": customer, "event_type": "api_request", "timestamp": ts,
                 "properties": {"bytes": 1, **props}}
                for t in ids
            ]
        ),
        NOW,
    )  # fmt: skip


async def committed(dedup: Dedup, b: Batch) -> None:
    f = flush()
    r = await dedup.reserve(b, f)
    assert r.accepted == len(b)
    await dedup.commit(f)


async def test_same_id_for_two_customers_is_two_reservations(dedup: Dedup) -> None:
    await committed(dedup, events_of("cust_a", ["inv_0001", "inv_0002"]))
    r = await dedup.reserve(events_of("cust_b", ["inv_0001", "inv_0002"]), flush())
    assert (r.accepted, r.duplicates, r.keep) == (2, 0, None)


async def test_same_key_other_content_is_a_conflict(dedup: Dedup) -> None:
    await committed(dedup, events_of("cust_a", ["t1", "t2", "t3", "t4"]))
    retry = events_of("cust_a", ["t1"])
    moved = events_of("cust_a", ["t2"], ts=NOW - 1)
    changed = events_of("cust_a", ["t3"], region="eu")
    b = decode_batch(
        b'{"events":['
        + b",".join(x.archive_lines().strip() for x in (retry, moved, changed, events_of("cust_a", ["t5"])))
        + b"]}",
        NOW,
    )
    r = await dedup.reserve(b, flush())
    assert (r.accepted, r.duplicates, r.in_flight) == (1, 1, [])
    assert r.conflicts == [(1, 2), (2, 4)]  # timestamp; properties
    assert r.keep == b"\x00\x00\x00\x01"


async def test_concurrent_reservations_accept_each_id_once(dedup: Dedup) -> None:
    b = batch(300, seed=4)
    results = await asyncio.gather(*(dedup.reserve(b, flush()) for _ in range(10)))
    assert sum(r.accepted for r in results) == 300
    assert all(r.accepted in (0, 300) or r.keep is not None for r in results)


async def test_ids_of_a_dead_flush_are_taken_over_after_the_timeout(redis_server: Redis) -> None:
    d = await started_redis_dedup(redis_server, flush_timeout_s=2)
    b = batch(20, seed=5)
    dead = new_flush_id(NOW - 3_000)  # a flush that reserved, then its process died
    await d.reserve(b, dead)
    r = await d.reserve(batch(20, seed=5), new_flush_id())
    assert r.accepted == 20  # taken over from the dead flush, atomically
    loser = await d.reserve(b, new_flush_id())
    assert loser.accepted == 0 and len(loser.in_flight) == 20
    await d.close()


async def test_take_over_stores_the_new_events_fingerprint(redis_server: Redis) -> None:
    """The event that takes over a dead flush's key is the one later retries compare with."""
    d = await started_redis_dedup(redis_server, flush_timeout_s=2)
    await d.reserve(events_of("c", ["x", "y"]), new_flush_id(NOW - 3_000))
    other = events_of("c", ["x", "y"], ts=NOW - 7)  # never acknowledged: other content may take over
    f = new_flush_id()
    r = await d.reserve(other, f)
    assert (r.accepted, r.conflicts) == (2, [])
    await d.commit(f)
    assert (await d.reserve(other, new_flush_id())).duplicates == 2
    first = await d.reserve(events_of("c", ["x", "y"]), new_flush_id())
    assert first.conflicts == [(0, 2), (1, 2)]
    await d.close()


async def test_release_frees_only_this_flushs_keys(redis_server: Redis) -> None:
    d = await started_redis_dedup(redis_server)
    b = events_of("c", ["r1", "r2"])
    mine, theirs = new_flush_id(), new_flush_id()
    await d.reserve(events_of("c", ["r1"]), mine)
    await d.reserve(b, theirs)  # r2 is theirs
    await d.release(mine, [b.key(0), b.key(1)])
    r = await d.reserve(b, new_flush_id())
    assert (r.accepted, r.in_flight) == (1, [1])
    await d.close()


async def test_redis_down_is_dedup_unavailable() -> None:
    d = RedisDedup(Settings(dedup="redis", redis_url=f"redis://127.0.0.1:{free_port()}/0"))
    await d.start()
    with pytest.raises(DedupUnavailable):
        await d.reserve(batch(3), flush())
    with pytest.raises(DedupUnavailable):
        await d.ping()
    await d.close()


def test_warm_up_reads_bounded_runs_of_hours() -> None:
    counts = [{"h": 10, "n": 30}, {"h": 11, "n": 30}, {"h": 13, "n": 50}, {"h": 14, "n": 1}, {"h": 20, "n": 5}]
    runs = list(hour_runs(counts, 60))
    hour = 3_600_000
    assert runs == [(10 * hour, 12 * hour), (13 * hour, 21 * hour)]
    assert list(hour_runs([{"h": 1, "n": 500}], 60)) == [(hour, 2 * hour)]  # one hour may hold more
    assert list(hour_runs([], 60)) == []


async def test_concurrent_reservations_share_one_connection_and_each_gets_its_own_verdict(
    redis_server: Redis,
) -> None:
    d = await started_redis_dedup(redis_server, flush_timeout_s=60)
    batches = [batch(3, seed=100 + i) for i in range(40)]
    flushes = [flush() for _ in batches]
    first = await asyncio.gather(*(d.reserve(b, f) for b, f in zip(batches, flushes, strict=True)))
    assert [r.accepted for r in first] == [3] * 40
    for f in flushes[::2]:
        await d.commit(f)
    # At once: the same ids again (committed: duplicates; not committed: in flight) and new ones.
    again = [batches[i] if i % 3 else batch(3, seed=300 + i) for i in range(40)]
    second = await asyncio.gather(*(d.reserve(b, flush()) for b in again))
    for i, r in enumerate(second):
        expected = (0, 0, [0, 1, 2]) if i % 3 and i % 2 else (0, 3, []) if i % 3 else (3, 0, [])
        assert (r.accepted, r.duplicates, r.in_flight) == expected, i
    clients = await d.redis.client_list()
    assert len([c for c in clients if c["cmd"] == "echo"]) == 1  # 80 reservations, one connection
    await d.close()


async def test_a_lost_connection_fails_the_waiting_reservations_and_the_next_one_reconnects(
    redis_server: Redis,
) -> None:
    d = await started_redis_dedup(redis_server)
    assert (await d.reserve(batch(1, seed=400), flush())).accepted == 1
    await d.redis.execute_command("CLIENT", "PAUSE", "20000", "WRITE")
    try:
        waiting = asyncio.ensure_future(d.reserve(batch(1, seed=401), flush()))

        async def held() -> bool:
            return int((await d.redis.info("clients"))["blocked_clients"]) == 1

        await until(held, "the reservation held by the paused server")
        await d.redis.client_kill_filter(_type="normal", skipme=True)
        with pytest.raises(DedupUnavailable):
            await asyncio.wait_for(waiting, 10)
    finally:
        await d.redis.execute_command("CLIENT", "UNPAUSE")
    assert (await d.reserve(batch(1, seed=402), flush())).accepted == 1  # a new connection
    await d.close()


async def test_a_queued_reservation_tells_the_stream_length_so_the_api_reads_none(redis_server: Redis) -> None:
    """Async mode: the reservation's own reply carries the stream's length and bytes, the API's backpressure;
    the byte count is exactly the bytes of the entries' events."""
    d = await started_redis_dedup(redis_server)
    batches = [batch(5, seed=7), batch(5, seed=8)]
    first = await d.reserve_queued(batches[0], new_flush_id(), STREAM)
    second = await d.reserve_queued(batches[1], new_flush_id(), STREAM)
    assert (first.stream_length, second.stream_length) == (1, 2)
    sizes = [len(b.archive_lines()) for b in batches]
    assert (first.stream_bytes, second.stream_bytes) == (sizes[0], sizes[0] + sizes[1])
    again = await d.reserve_queued(batch(5, seed=8), new_flush_id(), STREAM)  # duplicates still queue an entry
    assert again.duplicates == 5 and again.stream_length == 3 and again.stream_bytes == sizes[0] + 2 * sizes[1]
    entries = await d.redis.xrange(STREAM)
    assert int(await d.redis.get(STREAM_BYTES)) == sum(len(f[b"e"]) for _, f in entries)
    stream = EventStream(d.redis, max_entries=10, max_bytes=1 << 20)

    async def xlen_calls() -> int:
        return int((await d.redis.info("commandstats")).get("cmdstat_xlen", {}).get("calls", 0))

    calls = await xlen_calls()
    stream.seen(3, 300)
    assert await stream.size() == (3, 300)
    assert await xlen_calls() == calls  # answered from the reply, no XLEN
    await d.close()


async def test_ids_of_a_queued_flush_are_never_taken_over(redis_server: Redis) -> None:
    """Async mode: a flush's entry may wait in the stream past the flush timeout; its ids stay its own."""
    d = await started_redis_dedup(redis_server, flush_timeout_s=2)
    stream = "test:stream"
    b = batch(20, seed=6)
    old = new_flush_id(NOW - 3_000)  # queued long ago, not yet committed by a worker
    assert (await d.reserve_queued(b, old, stream)).accepted == 20
    assert await d.redis.xlen(stream) == 1
    again = await d.reserve(batch(20, seed=6), new_flush_id())
    assert again.accepted == 0 and again.duplicates == 20  # queued is as good as committed
    # Without its marker (a flush whose process died before queueing) the ids are
    # taken over, and in queued mode the keys won get a stream entry of their own.
    await d.redis.delete(QUEUED_PREFIX + old)
    mine = new_flush_id()
    assert (await d.reserve_queued(batch(20, seed=6), mine, stream)).accepted == 20
    entries = await d.redis.xrange(stream)
    assert [e[1][b"f"].decode() for e in entries][:2] == [old, mine] and len(entries) == 3
    taker = entries[2][1][b"f"]
    assert taker.decode() not in (old, mine) and await d.redis.get(QUEUED_PREFIX + taker.decode())
    assert (await d.redis.get(KEY_PREFIX + b.key(0))).startswith(taker + b"|")
    assert entries[2][1][b"e"].count(b"\n") == 20
    await d.close()


class _LostAfterPipeline(RedisDedup):
    """Real Redis; the connection is lost right after the reservation pipeline (a Redis crash's timing)."""

    async def _resolve(self, *args: object, **kwargs: object) -> Reservation:
        raise RedisError("Connection lost")


async def test_a_request_failing_while_reserving_leaves_its_flush_uncommitted(
    redis_server: Redis, chdb_storage: EmbeddedStorage
) -> None:
    """Its keys may be held by the flush without its rows: a commit record would make
    them duplicates never stored. So the flush commits nothing and its ids are taken over."""
    flush_redis(redis_server)
    settings = Settings(dedup="redis", redis_url=redis_server.url, flush_timeout_s=1)
    plain, lossy = RedisDedup(settings), _LostAfterPipeline(settings)
    await plain.start()
    await lossy.start()
    f = new_flush_id()
    await plain.reserve(events_of("c_lost", ["held"]), f)
    await plain.commit(f)
    service = IngestService(settings, chdb_storage, lossy, Metrics())
    good, bad = events_of("c_lost", ["g1"]), events_of("c_lost", ["held", "n1", "n2"])
    answers = await asyncio.gather(service.accept(good), service.accept(bad), return_exceptions=True)
    assert isinstance(answers[0], IngestResult) and answers[0].accepted == 1  # stored, in the same flush
    assert isinstance(answers[1], Unavailable)

    async def retried() -> bool:
        r = await plain.reserve(events_of("c_lost", ["n1", "n2"]), new_flush_id())
        assert r.duplicates == 0, "the failed request's events are reported as duplicates, never stored"
        return r.accepted == 2

    await until(retried, "the failed request's ids taken over", 10, every=0.2)
    await plain.close()
    await lossy.close()


PING = b"*1\r\n$4\r\nPING\r\n"


def _pong(replies: bytes) -> bytes:
    return replies


async def test_a_request_on_a_closed_connection_fails_at_once(redis_server: Redis) -> None:
    """Nobody reads a closed connection: a request sent on it would wait forever."""
    reader, writer = await asyncio.open_connection("127.0.0.1", redis_server.port)
    conn = Multiplexed(reader, writer)
    assert await asyncio.wait_for(conn.send(PING, _pong), 10) == b"+PONG\r\n"
    conn.close()
    await conn.wait_closed()
    sent = conn.send(PING, _pong)
    assert sent.done()
    with pytest.raises(ConnectionError):
        sent.result()


async def test_a_finished_connect_is_never_handed_out_again(redis_server: Redis) -> None:
    """A connect that finished (its waiters gone) and whose connection closed since: the next request connects anew."""
    d = await started_redis_dedup(redis_server)
    assert (await d.reserve(batch(1, seed=500), flush())).accepted == 1
    old = d._link._conn
    assert old is not None
    old.close()
    await old.wait_closed()

    async def connected() -> Multiplexed:
        return old

    d._link._conn, d._link._connecting = None, asyncio.ensure_future(connected())
    await asyncio.wait_for(asyncio.shield(d._link._connecting), 10)
    r = await asyncio.wait_for(d.reserve(batch(1, seed=501), flush()), 10)
    assert r.accepted == 1
    assert d._link._conn is not old and not d._link._conn.closed
    await d.close()


class _Panic(BaseException):
    """What a Rust panic in a parser raises (pyo3's PanicException is a BaseException)."""


def _panics(replies: bytes) -> bytes:
    raise _Panic("parser panicked")


async def test_a_parser_raising_past_exception_closes_the_connection_and_fails_its_requests(
    redis_server: Redis,
) -> None:
    d = await started_redis_dedup(redis_server)
    assert (await d.reserve(batch(1, seed=510), flush())).accepted == 1
    conn = d._link._conn
    assert conn is not None
    panicking, behind = conn.send(PING, _panics), conn.send(PING, _pong)
    for sent in (panicking, behind):
        with pytest.raises(ConnectionError):
            await asyncio.wait_for(sent, 10)
    assert conn.closed
    with pytest.raises(ConnectionError):
        await asyncio.wait_for(conn.send(PING, _pong), 10)  # nobody reads it any more
    (ended,) = await asyncio.gather(conn._reading, return_exceptions=True)
    assert isinstance(ended, _Panic)
    assert (await asyncio.wait_for(d.reserve(batch(1, seed=511), flush()), 10)).accepted == 1  # a new connection
    await d.close()


async def test_a_commit_record_lost_with_its_connection_is_sent_again_on_a_new_one(redis_server: Redis) -> None:
    d = await started_redis_dedup(redis_server)
    f = flush()
    assert (await d.reserve(batch(1, seed=520), f)).accepted == 1
    await d.redis.execute_command("CLIENT", "PAUSE", "20000", "WRITE")
    try:
        committing = asyncio.ensure_future(d.commit(f))

        async def held() -> bool:
            return int((await d.redis.info("clients"))["blocked_clients"]) == 1

        await until(held, "the commit record held by the paused server")
        await d.redis.client_kill_filter(_type="normal", skipme=True)  # the commit's connection is lost
    finally:
        await d.redis.execute_command("CLIENT", "UNPAUSE")
    await asyncio.wait_for(committing, 10)
    assert await d.redis.get(FLUSH_PREFIX + f) == b"committed"
    await d.close()
