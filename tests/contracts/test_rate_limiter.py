"""The rate limiter suite every backend passes: the in-process limiter and Redis, through the protocol only."""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import AsyncIterator

import pytest

from meterflow.auth.ratelimit import RateLimiter, open_rate_limiter
from meterflow.config import Settings
from tests.harness.processes import Redis, flush_redis

_bucket = itertools.count(1)


@pytest.fixture(params=["memory", "redis"])
async def limiter(request: pytest.FixtureRequest) -> AsyncIterator[RateLimiter]:
    """Each limiter as a server opens it. The limits below are small, so the Redis limiter's local
    lease is one token and every check is the shared, exact one."""
    if request.param == "redis":
        redis: Redis = request.getfixturevalue("redis_server")
        flush_redis(redis)
        rl = open_rate_limiter(Settings(dedup="redis", redis_url=redis.url))
    else:
        rl = open_rate_limiter(Settings(dedup="memory"))
    await rl.start()
    yield rl
    await rl.close()


def bucket() -> str:
    return f"contract-{next(_bucket)}"


async def test_a_burst_passes_then_checks_are_denied(limiter: RateLimiter) -> None:
    b = bucket()
    verdicts = [await limiter.check(b, rate=1, burst=5) for _ in range(7)]
    assert [v.allowed for v in verdicts] == [True] * 5 + [False] * 2
    assert [v.remaining for v in verdicts[:5]] == [4, 3, 2, 1, 0]
    assert {v.limit for v in verdicts} == {5}


async def test_a_denied_check_says_when_to_retry(limiter: RateLimiter) -> None:
    b = bucket()
    assert (await limiter.check(b, rate=1, burst=1)).allowed
    denied = await limiter.check(b, rate=1, burst=1)
    assert not denied.allowed and denied.remaining == 0
    assert 0 < denied.retry_after_s <= 1.0
    assert denied.headers()["Retry-After"] == "1"
    assert denied.headers()["RateLimit-Limit"] == "1" and denied.headers()["RateLimit-Remaining"] == "0"


async def test_the_bucket_refills_at_the_rate(limiter: RateLimiter) -> None:
    b = bucket()
    assert (await limiter.check(b, rate=20, burst=1)).allowed
    denied = await limiter.check(b, rate=20, burst=1)
    assert not denied.allowed
    await asyncio.sleep(denied.retry_after_s + 0.02)  # the time the verdict names, and a margin
    assert (await limiter.check(b, rate=20, burst=1)).allowed


async def test_a_denied_check_spends_nothing(limiter: RateLimiter) -> None:
    b = bucket()
    assert (await limiter.check(b, rate=1, burst=5, cost=3)).allowed
    assert not (await limiter.check(b, rate=1, burst=5, cost=3)).allowed  # two left
    assert (await limiter.check(b, rate=1, burst=5, cost=2)).allowed


async def test_a_cost_above_the_burst_is_never_allowed(limiter: RateLimiter) -> None:
    b = bucket()
    assert not (await limiter.check(b, rate=1000, burst=10, cost=11)).allowed
    after = await limiter.check(b, rate=1000, burst=10, cost=1)
    assert after.allowed and after.remaining == 9


async def test_buckets_are_independent(limiter: RateLimiter) -> None:
    a, b = bucket(), bucket()
    for _ in range(3):
        await limiter.check(a, rate=1, burst=3)
    assert not (await limiter.check(a, rate=1, burst=3)).allowed
    assert (await limiter.check(b, rate=1, burst=3)).remaining == 2


async def test_ping_answers(limiter: RateLimiter) -> None:
    await limiter.ping()
