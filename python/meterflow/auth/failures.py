"""Failed authentication, counted per subject: past a limit a minute, that subject's failures answer 429.

A key is always checked first: a valid key authenticates, whatever failed before
it from the same address. Only failures are counted, in a fixed one-minute window,
and each against what it guesses at:

- an unknown, malformed or revoked key counts for the client's address
  (`addr:<address>`): it slows a brute force of unknown keys from that address;
- a known key id with a wrong secret counts for that key id (`key:<id>`), from
  every address: it slows a guess of one key's secret, and locks no address out.

Past the limit, the subject's further failures answer 429 with `Retry-After`
(instead of 401) until the window ends. A request with a valid key never sees
the 429: a NAT, a proxy, or a device that still sends a revoked key beside a
valid one cannot lock the valid key out, and a wrong secret for a key id sent by
someone else does not stop the key's holder. (A secret has about 190 bits: the
limit bounds the work a guesser makes, it is not what keeps keys secret.)

In-process (embedded) the counts live in bounded tables. With Redis
(`MF_DEDUP=redis`) the counts are shared by every worker (one `INCR` per
failure); each worker remembers the subjects it has seen over the limit, so
their further failures cost no round trip. A worker that has not yet seen the
limit passed lets one more failure through before it learns it: the limit holds
to within one attempt per worker. If Redis is down, the in-process count of the
worker stands in.
"""

from __future__ import annotations

import math
import time
from collections import OrderedDict

from redis.exceptions import RedisError

from meterflow.redis import open_fail_fast

WINDOW_S = 60
MAX_SUBJECTS = 100_000  # addresses (and apart, key ids) remembered per worker; the least recent go first


class _Bounded:
    """subject -> (window, value), at most MAX_SUBJECTS entries, least recently used dropped."""

    def __init__(self) -> None:
        self._d: OrderedDict[str, tuple[int, int]] = OrderedDict()

    def get(self, subject: str, window: int) -> int:
        hit = self._d.get(subject)
        return hit[1] if hit is not None and hit[0] == window else 0

    def put(self, subject: str, window: int, value: int) -> None:
        self._d[subject] = (window, value)
        self._d.move_to_end(subject)
        while len(self._d) > MAX_SUBJECTS:
            self._d.popitem(last=False)

    def __len__(self) -> int:
        return len(self._d)


class _Counts:
    """The counts of one kind of subject and the subjects over the limit this window."""

    def __init__(self) -> None:
        self.counts = _Bounded()
        self.blocked = _Bounded()  # subject -> 1 in the window it is over the limit in


class AuthFailures:
    """The failure counts per address and per key id; `redis_url` shares them between workers."""

    def __init__(self, per_minute: int, redis_url: str | None = None) -> None:
        self.per_minute = per_minute
        # Apart: a flood of unknown keys from many addresses evicts no key id's count.
        self._kinds = {"addr": _Counts(), "key": _Counts()}
        self._redis = open_fail_fast(redis_url) if redis_url else None
        self.name = "redis" if redis_url else "memory"

    async def start(self) -> None:
        pass  # connects on first use; while Redis is away the worker's own count stands in

    async def ping(self) -> None:
        """Raises when the shared count (Redis) does not answer."""
        if self._redis is not None:
            await self._redis.ping()

    async def failed(self, address: str, key_id: str | None = None) -> int | None:
        """Counts one failed key: against `key_id` when the id is known and the secret wrong, else
        against `address`. Returns Retry-After seconds when that subject is over the limit this minute."""
        kind, subject = ("key", key_id) if key_id is not None else ("addr", address)
        counts = self._kinds[kind]
        now = time.time()
        window = int(now // WINDOW_S)
        wait = max(1, math.ceil((window + 1) * WINDOW_S - now))
        if counts.blocked.get(subject, window):
            return wait  # known over the limit: no round trip
        count = counts.counts.get(subject, window) + 1
        counts.counts.put(subject, window, count)
        if self._redis is not None:
            key = f"authfail:{kind}:{subject}:{window}"
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
        counts.blocked.put(subject, window, 1)
        return wait

    async def close(self) -> None:
        if self._redis is not None:
            await self._redis.aclose()
