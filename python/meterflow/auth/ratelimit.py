"""Per-key rate limits (GCRA): requests/s and events/s, each with a burst.

Redis: one script call per check, atomic, shared by every worker; large limits
are spent from a local lease taken in one such call (LeasedRateLimiter).
In-process: the same arithmetic for the embedded mode's single worker.
"""

from __future__ import annotations

import asyncio
import math
import time
from dataclasses import dataclass
from typing import Protocol

from redis.exceptions import RedisError

from meterflow.config import Settings
from meterflow.redis import open_pool


@dataclass(frozen=True)
class Verdict:
    allowed: bool
    limit: int
    remaining: int
    retry_after_s: float  # when denied: until the request would pass
    reset_s: float  # until the bucket is full again

    def headers(self) -> dict[str, str]:
        h = {
            "RateLimit-Limit": str(self.limit),
            "RateLimit-Remaining": str(self.remaining),
            "RateLimit-Reset": str(math.ceil(self.reset_s)),
        }
        if not self.allowed:
            h["Retry-After"] = str(max(1, math.ceil(self.retry_after_s)))
        return h


class RateLimitUnavailable(Exception):
    pass


def gcra(tat_ms: float, now_ms: float, rate: int, burst: int, cost: int) -> tuple[Verdict, float]:
    """One GCRA step; returns the verdict and the new theoretical arrival time."""
    interval = 1000.0 / rate
    tolerance = interval * burst
    tat = max(tat_ms, now_ms)
    new_tat = tat + interval * cost
    allow_at = new_tat - tolerance
    if cost > burst or allow_at > now_ms:
        remaining = max(0, int((tolerance - (tat - now_ms)) / interval))
        return Verdict(False, burst, remaining, (allow_at - now_ms) / 1000, (tat - now_ms) / 1000), tat_ms
    remaining = max(0, int((tolerance - (new_tat - now_ms)) / interval))
    return Verdict(True, burst, remaining, 0.0, (new_tat - now_ms) / 1000), new_tat


class RateLimiter(Protocol):
    name: str

    async def start(self) -> None: ...

    async def close(self) -> None: ...

    async def ping(self) -> None:
        """Raises RateLimitUnavailable when the store does not answer."""

    async def check(self, bucket: str, rate: int, burst: int, cost: int = 1) -> Verdict: ...


class MemoryRateLimiter:
    name = "memory"

    def __init__(self) -> None:
        self._tat: dict[str, float] = {}

    async def start(self) -> None:
        pass

    async def close(self) -> None:
        pass

    async def ping(self) -> None:
        pass

    async def check(self, bucket: str, rate: int, burst: int, cost: int = 1) -> Verdict:
        now = time.time() * 1000
        verdict, tat = gcra(self._tat.get(bucket, 0.0), now, rate, burst, cost)
        self._tat[bucket] = tat
        if len(self._tat) > 100_000:  # forget full buckets
            self._tat = {k: v for k, v in self._tat.items() if v > now}
        return verdict


_GCRA = """
local now = redis.call('TIME')
local now_ms = now[1] * 1000 + now[2] / 1000
local rate, burst, cost = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local interval = 1000.0 / rate
local tolerance = interval * burst
local tat = tonumber(redis.call('GET', KEYS[1]) or '0')
if tat < now_ms then tat = now_ms end
local new_tat = tat + interval * cost
local allow_at = new_tat - tolerance
if cost > burst or allow_at > now_ms then
  local remaining = math.floor((tolerance - (tat - now_ms)) / interval)
  return {0, math.max(remaining, 0), tostring(allow_at - now_ms), tostring(tat - now_ms)}
end
redis.call('SET', KEYS[1], tostring(new_tat), 'PX', math.ceil(new_tat - now_ms) + 1000)
local remaining = math.floor((tolerance - (new_tat - now_ms)) / interval)
return {1, math.max(remaining, 0), '0', tostring(new_tat - now_ms)}
"""


REDIS_CONNECTIONS = 64


class RedisRateLimiter:
    name = "redis"

    def __init__(self, url: str) -> None:
        # A bounded pool that waits for a free connection (see open_pool).
        self._redis = open_pool(url, REDIS_CONNECTIONS)
        self._script = self._redis.register_script(_GCRA)

    async def start(self) -> None:
        pass  # connects on first use; limits fail open while Redis is away

    async def ping(self) -> None:
        try:
            await self._redis.ping()
        except (RedisError, OSError) as e:
            raise RateLimitUnavailable(str(e)) from e

    async def check(self, bucket: str, rate: int, burst: int, cost: int = 1) -> Verdict:
        try:
            allowed, remaining, retry, reset = await self._script(keys=[f"rl:{bucket}"], args=[rate, burst, cost])
        except (RedisError, OSError) as e:
            raise RateLimitUnavailable(str(e)) from e
        return Verdict(bool(allowed), burst, int(remaining), float(retry) / 1000, float(reset) / 1000)

    async def close(self) -> None:
        # The pool is this limiter's own (passed in, so redis-py would leave it open).
        await self._redis.aclose(close_connection_pool=True)


# A lease is at most 1% of a second's rate and a tenth of the burst, and lasts a second.
LEASE_RATE_SHARE = 100
LEASE_BURST_SHARE = 10
LEASE_S = 1.0
# A lease in use is renewed in the background once this share of its time or of its tokens is gone,
# so that a busy bucket's checks never wait for Redis.
RENEW_SHARE = 0.75


def lease_size(rate: int, burst: int) -> int:
    """Tokens a worker reserves ahead for a bucket; 1 means no lease (every check asks Redis)."""
    return max(1, min(rate // LEASE_RATE_SHARE, burst // LEASE_BURST_SHARE))


@dataclass
class Lease:
    tokens: int
    expires: float
    remaining: int  # the shared bucket's remaining tokens when the lease was taken
    renew_below: int  # tokens left that start a renewal
    renew_at: float  # time that starts a renewal
    spent: int = 0
    # A renewal taken while this lease was in use: it takes over once this one is used up or expired.
    next: Lease | None = None


class LeasedRateLimiter:
    """Large limits answered from a local lease, without a round trip: one shared
    check takes a lease of tokens, and this worker's checks of the bucket spend it
    until it is used up or a second old. Checks that find no lease share one
    round trip per bucket and worker, and a lease in use is renewed ahead, in the
    background, so a busy bucket's checks never wait for Redis. The renewal is held
    as the next lease, spent once the current one is used up, so the tokens the
    current one still has are not thrown away. A token is spent within a lease's
    second of leaving the shared bucket or never: the unspent tokens of an expired
    lease are counted as spent, so a limit is at most two leases per worker per
    second stricter, never looser. Small limits (a lease of 1) ask Redis every time."""

    def __init__(self, shared: RedisRateLimiter) -> None:
        self.shared = shared
        self.name = shared.name
        self._leases: dict[str, Lease] = {}
        self._renewing: dict[str, asyncio.Task[None]] = {}

    async def start(self) -> None:
        await self.shared.start()

    async def close(self) -> None:
        renewing = list(self._renewing.values())
        for task in renewing:
            task.cancel()
        await asyncio.gather(*renewing, return_exceptions=True)
        await self.shared.close()

    async def ping(self) -> None:
        await self.shared.ping()

    def _spend(self, bucket: str, rate: int, burst: int, size: int, cost: int) -> Verdict | None:
        """A verdict from the local lease, without any await; None when it cannot answer."""
        lease = self._leases.get(bucket)
        if lease is None:
            return None
        now = time.monotonic()
        if (lease.tokens < cost or now >= lease.expires) and lease.next is not None:
            lease = self._leases[bucket] = lease.next  # the renewal takes over
        if lease.tokens < cost or now >= lease.expires:
            return None
        lease.tokens -= cost
        lease.spent += cost
        renew = lease.next is None and (lease.tokens < lease.renew_below or now >= lease.renew_at)
        if renew and bucket not in self._renewing:
            self._renew(bucket, rate, burst, size)
        return Verdict(True, burst, max(0, lease.remaining - lease.spent), 0.0, lease.expires - now)

    def _renew(self, bucket: str, rate: int, burst: int, size: int) -> asyncio.Task[None]:
        task = asyncio.get_running_loop().create_task(self._take_lease(bucket, rate, burst, size))
        self._renewing[bucket] = task
        task.add_done_callback(lambda t: self._renewing.pop(bucket, None) if self._renewing.get(bucket) is t else None)
        return task

    async def _take_lease(self, bucket: str, rate: int, burst: int, size: int) -> None:
        """One shared check for a whole lease; no lease when the bucket has no room (or Redis is away)."""
        try:
            verdict = await self.shared.check(bucket, rate, burst, size)
        except RateLimitUnavailable:
            return  # the waiting checks ask Redis themselves, and fail open there
        if verdict.allowed:
            self._keep(bucket, size, verdict.remaining)

    def _keep(self, bucket: str, size: int, remaining: int) -> None:
        now = time.monotonic()
        if len(self._leases) > 100_000:  # forget expired leases
            self._leases = {k: v for k, v in self._leases.items() if v.expires > now}
        below = int(size * (1 - RENEW_SHARE))
        lease = Lease(size, now + LEASE_S, remaining, below, now + LEASE_S * RENEW_SHARE)
        current = self._leases.get(bucket)
        if current is not None and current.next is None and current.tokens > 0 and now < current.expires:
            current.next = lease  # a renewal: the current lease's tokens are spent first, within their own second
        else:
            self._leases[bucket] = lease

    async def check(self, bucket: str, rate: int, burst: int, cost: int = 1) -> Verdict:
        size = lease_size(rate, burst)
        if size == 1:
            return await self.shared.check(bucket, rate, burst, cost)
        verdict = self._spend(bucket, rate, burst, size, cost)
        if verdict is not None:
            return verdict
        if cost <= size:
            # One round trip per bucket and worker: the checks that find no lease share it.
            await asyncio.shield(self._renewing.get(bucket) or self._renew(bucket, rate, burst, size))
            verdict = self._spend(bucket, rate, burst, size, cost)
            if verdict is not None:
                return verdict
        # No room for a lease (or a cost larger than one): the exact check decides.
        return await self.shared.check(bucket, rate, burst, cost)


def open_rate_limiter(settings: Settings) -> RateLimiter:
    """Shared by every worker through Redis in the full stack; per process when embedded."""
    if settings.dedup == "redis":
        return LeasedRateLimiter(RedisRateLimiter(settings.redis_url))
    return MemoryRateLimiter()
