"""Auth: API keys (hashed, scoped, revocable, optionally bound to one customer), per-key rate limits and the
count of failed authentications per address.

Owns: the keys' records and cache, the rate limiters (in-process and Redis) and the failure counts.
Does not own: reading a key from a request or answering 401/403/429 (`web.guard`), nor the Redis
connection (`meterflow.redis`).
"""
