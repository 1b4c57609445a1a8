"""Failed authentication, counted per client address: past a limit a minute, the address waits.

Each failure (an unknown, malformed or revoked key) counts in a fixed one-minute
window for the client's address. When the count passes the limit, every request
of that address that carries a key is answered 429 with `Retry-After` until the
window ends, before any key is looked up, so a right guess cannot get through.

In-process (embedded) the counts live in a bounded table. With Redis
(`MF_DEDUP=redis`) the counts are shared by every worker (one `INCR` per
failure); each worker remembers the block it has seen, so a blocked address
costs no round trip. A worker that has not yet seen the block lets one more
failure through before it learns it: the limit holds to within one attempt
per worker. If Redis is down, the in-process count of the worker stands in.
"""

from __future__ import annotations

import math
import time
from collections import OrderedDict

from redis.exceptions import RedisError

from meterflow.redis import open_fail_fast

WINDOW_S = 60
MAX_ADDRESSES = 100_000  # distinct addresses remembered per worker; the oldest go first


class _Bounded:
    """address -> (window, value), at most MAX_ADDRESSES entries, least recently used dropped."""

    def __init__(self) -> None:
        self._d: OrderedDict[str, tuple[int, int]] = OrderedDict()

    def get(self, address: str, window: int) -> int:
        hit = self._d.get(address)
        return hit[1] if hit is not None and hit[0] == window else 0

    def put(self, address: str, window: int, value: int) -> None:
        self._d[address] = (window, value)
        self._d.move_to_end(address)
        while len(self._d) > MAX_ADDRESSES:
            self._d.popitem(last=False)

    def __len__(self) -> int:
        return len(self._d)


class AuthFailures:
    """The failure count per address; `redis_url` shares it between workers."""

    def __init__(self, per_minute: int, redis_url: str | None = None) -> None:
        self.per_minute = per_minute
        self._counts = _Bounded()
        self._blocked = _Bounded()  # address -> window it is blocked in (value 1)
        self._redis = open_fail_fast(redis_url) if redis_url else None
        self.name = "redis" if redis_url else "memory"

    async def start(self) -> None:
        pass  # connects on first use; while Redis is away the worker's own count stands in

    async def ping(self) -> None:
        """Raises when the shared count (Redis) does not answer."""
        if self._redis is not None:
            await self._redis.ping()

    @staticmethod
    def _window(now: float) -> int:
        return int(now // WINDOW_S)

    def retry_after(self, address: str) -> int | None:
        """Seconds this address must wait, or None when it may try a key."""
        now = time.time()
        window = self._window(now)
        if not self._blocked.get(address, window):
            return None
        return max(1, math.ceil((window + 1) * WINDOW_S - now))

    async def failed(self, address: str) -> int | None:
        """Counts one failure; returns Retry-After seconds when it took the address over the limit."""
        now = time.time()
        window = self._window(now)
        count = self._counts.get(address, window) + 1
        self._counts.put(address, window, count)
        if self._redis is not None:
            key = f"authfail:{address}:{window}"
            try:
                async with self._redis.pipeline(transaction=False) as pipe:
                    pipe.incr(key)
                    pipe.expire(key, WINDOW_S * 2)
                    shared, _ = await pipe.execute()
                count = max(count, int(shared))
            except (RedisError, OSError):
                pass  # this worker's own count stands in
        if count <= self.per_minute:
            return None
        self._blocked.put(address, window, 1)
        return max(1, math.ceil((window + 1) * WINDOW_S - now))

    async def close(self) -> None:
        if self._redis is not None:
            await self._redis.aclose()
