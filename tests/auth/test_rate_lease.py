"""Large rate limits spent from a local lease: fewer Redis round trips, never a looser limit."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, cast

import redis.asyncio as aioredis

from meterflow.auth.ratelimit import RENEW_SHARE, LeasedRateLimiter, RedisRateLimiter, Verdict, lease_size
from tests.harness.processes import Redis


def test_lease_size_is_one_for_small_limits() -> None:
    assert lease_size(100, 200) == 1  # the default requests/s: every check asks Redis
    assert lease_size(100, 150) == 1
    assert lease_size(100_000, 200_000) == 1000  # the default events/s
    assert lease_size(1_000_000, 50) == 5  # a tenth of the burst at most


class CountingLimiter(RedisRateLimiter):
    """The real Redis limiter, counting its round trips."""

    def __init__(self, url: str) -> None:
        super().__init__(url)
        self.calls = 0

    async def check(self, bucket: str, rate: int, burst: int, cost: int = 1) -> Verdict:
        self.calls += 1
        return await super().check(bucket, rate, burst, cost)


def answered_without_waiting(check: Coroutine[Any, Any, Verdict]) -> Verdict:
    """The verdict of a check that completes without suspending once (no await of Redis)."""
    try:
        check.send(None)
    except StopIteration as done:
        return cast(Verdict, done.value)
    check.close()
    raise AssertionError("the check waited for something")


async def wait_until(condition: Callable[[], Awaitable[bool]], deadline_s: float = 10.0) -> None:
    deadline = time.monotonic() + deadline_s
    while not await condition():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.01)


async def test_checks_within_a_lease_do_not_touch_the_shared_bucket(redis_server: Redis) -> None:
    limiter = LeasedRateLimiter(RedisRateLimiter(redis_server.url))
    raw = aioredis.from_url(redis_server.url)
    try:
        first = await limiter.check("lease-a", 10_000, 10_000, 1)  # takes a lease of 100, spends 1
        assert first.allowed
        tat = await raw.get("rl:lease-a")
        assert tat is not None
        # Until three quarters of the lease are spent, no check asks Redis, nor starts a renewal.
        renew_from = int(100 * RENEW_SHARE)
        for _ in range(renew_from - 1):
            assert answered_without_waiting(limiter.check("lease-a", 10_000, 10_000, 1)).allowed
        assert await raw.get("rl:lease-a") == tat  # answered from the lease
        assert not limiter._renewing
        # The check past that point is still answered at once; the renewal goes in the background.
        assert answered_without_waiting(limiter.check("lease-a", 10_000, 10_000, 1)).allowed

        async def renewed() -> bool:
            return await raw.get("rl:lease-a") != tat

        await wait_until(renewed)
        for _ in range(100):  # the renewed lease answers, again without a round trip
            assert answered_without_waiting(limiter.check("lease-a", 10_000, 10_000, 1)).allowed
    finally:
        await limiter.close()
        await raw.aclose()


async def test_checks_that_find_no_lease_share_one_round_trip(redis_server: Redis) -> None:
    shared = CountingLimiter(redis_server.url)
    limiter = LeasedRateLimiter(shared)
    try:
        verdicts = await asyncio.gather(*(limiter.check("lease-c", 100_000, 100_000, 1) for _ in range(200)))
        assert all(v.allowed for v in verdicts)
        assert shared.calls == 1  # one lease of 1000 for all 200 checks, not 200 round trips
    finally:
        await limiter.close()


async def test_a_cost_larger_than_a_lease_is_checked_exactly(redis_server: Redis) -> None:
    shared = CountingLimiter(redis_server.url)
    limiter = LeasedRateLimiter(shared)
    try:
        assert (await limiter.check("lease-d", 100_000, 100_000, 5000)).allowed  # a lease is 1000
        assert shared.calls == 1
        assert not (await limiter.check("lease-d", 100_000, 100_000, 200_000)).allowed  # over the burst
    finally:
        await limiter.close()


async def test_a_leased_limit_is_never_looser(redis_server: Redis) -> None:
    rate = burst = 1000  # a lease of 10 tokens
    workers = [LeasedRateLimiter(RedisRateLimiter(redis_server.url)) for _ in range(2)]
    try:
        t0 = time.monotonic()
        allowed = 0
        for i in range(3000):
            allowed += (await workers[i % 2].check("lease-b", rate, burst, 1)).allowed
        elapsed = time.monotonic() - t0
        assert allowed <= burst + elapsed * rate + 1
        # Denied on the shared bucket, a worker still passes a check that fits exactly (no lease).
        assert allowed >= burst - 2 * lease_size(rate, burst)
    finally:
        for w in workers:
            await w.close()


async def test_a_renewal_keeps_the_tokens_left_in_the_lease_in_use(redis_server: Redis) -> None:
    """The renewal is taken with a quarter of the lease left; those tokens are spent, not thrown away:
    N allowed checks cost N / lease round trips."""
    shared = CountingLimiter(redis_server.url)
    limiter = LeasedRateLimiter(shared)
    rate = burst = 100_000  # a lease of 1000 tokens
    size, n = lease_size(rate, burst), 10_000
    try:
        for _ in range(n):
            assert (await limiter.check("lease-e", rate, burst, 1)).allowed
            renewing = limiter._renewing.get("lease-e")
            if renewing is not None:
                await asyncio.wait_for(asyncio.shield(renewing), 10)  # Redis answers before the lease runs out
        assert shared.calls <= n // size + 1  # each lease spent whole, not three quarters of it
    finally:
        await limiter.close()
