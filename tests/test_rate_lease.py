"""Large rate limits spent from a local lease: fewer Redis round trips, never a looser limit."""

from __future__ import annotations

import time

import redis.asyncio as aioredis
from services import Redis

from meterflow.auth.ratelimit import LeasedRateLimiter, RedisRateLimiter, lease_size


def test_lease_size_is_one_for_small_limits() -> None:
    assert lease_size(100, 200) == 1  # the default requests/s: every check asks Redis
    assert lease_size(100, 150) == 1
    assert lease_size(100_000, 200_000) == 1000  # the default events/s
    assert lease_size(1_000_000, 50) == 5  # a tenth of the burst at most


async def test_checks_within_a_lease_do_not_touch_the_shared_bucket(redis_server: Redis) -> None:
    limiter = LeasedRateLimiter(RedisRateLimiter(redis_server.url))
    raw = aioredis.from_url(redis_server.url)
    try:
        first = await limiter.check("lease-a", 10_000, 10_000, 1)  # takes 1 + a lease of 100
        assert first.allowed
        tat = await raw.get("rl:lease-a")
        assert tat is not None
        for _ in range(100):
            assert (await limiter.check("lease-a", 10_000, 10_000, 1)).allowed
        assert await raw.get("rl:lease-a") == tat  # answered from the lease
        assert (await limiter.check("lease-a", 10_000, 10_000, 1)).allowed  # the lease is used up: a new one
        assert await raw.get("rl:lease-a") != tat
    finally:
        await limiter.close()
        await raw.aclose()


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
