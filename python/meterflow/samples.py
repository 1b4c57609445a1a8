"""Realistic sample events, shared by the tests, the benches and the load test."""

from __future__ import annotations

import random
from typing import Any

import orjson

from meterflow.kernel.clock import now_ms

ENDPOINTS = ("/v1/orders", "/v1/users", "/v1/search", "/v1/invoices", "/v1/files")
REGIONS = ("eu-west-1", "us-east-1", "ap-south-1")



def seed_event(timestamp: int | None = None) -> dict[str, Any]:
    """The README's example event: one API request of 2048 bytes by cust_123."""
    return {
        "transaction_id": "tx_001",
        "customer_id": "cust_123",
        "event_type": "api_request",
        "timestamp": now_ms() if timestamp is None else timestamp,
        "properties": {"bytes": 2048, "endpoint": "/v1/orders", "method": "POST"},
    }


def api_event(rng: random.Random, tid: str, ts: int, customers: int = 1000) -> dict[str, Any]:
    """One ~200-byte `api_request` event with realistic properties."""
    return {
        "transaction_id": tid,
        "customer_id": f"cust_{rng.randrange(customers):04d}",
        "event_type": "api_request",
        "timestamp": ts,
        "properties": {
            "bytes": rng.randrange(100, 1_000_000),
            "endpoint": rng.choice(ENDPOINTS),
            "method": rng.choice(("GET", "POST")),
            "region": rng.choice(REGIONS),
            "status": rng.choice((200, 200, 200, 201, 404, 500)),
            "cached": rng.random() < 0.3,
        },
    }


def batch(n: int, *, seed: int = 0, prefix: str = "tx", ts: int | None = None) -> list[dict[str, Any]]:
    rng = random.Random(seed)
    base = now_ms() if ts is None else ts
    return [api_event(rng, f"{prefix}_{seed}_{i:06d}", base - rng.randrange(60_000)) for i in range(n)]


def body(events: list[dict[str, Any]]) -> bytes:
    return orjson.dumps({"events": events})
