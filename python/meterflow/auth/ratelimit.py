"""Per-key rate limits (GCRA): requests/s and events/s, each with a burst.

Redis: one script call per check, atomic, shared by every worker.
In-process: the same arithmetic for the embedded mode's single worker.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Protocol

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from meterflow.config import Settings


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
        # A bounded pool that waits for a free connection: redis-py's default pool
        # refuses past 100 connections, which at a few hundred concurrent requests
        # would fail most checks open ("Too many connections").
        pool = aioredis.BlockingConnectionPool.from_url(
            url, max_connections=REDIS_CONNECTIONS, timeout=2, socket_timeout=2, socket_connect_timeout=2
        )
        self._redis = aioredis.Redis(connection_pool=pool)
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
        await self._redis.aclose()


def open_rate_limiter(settings: Settings) -> RateLimiter:
    """Shared by every worker through Redis in the full stack; per process when embedded."""
    return RedisRateLimiter(settings.redis_url) if settings.dedup == "redis" else MemoryRateLimiter()
