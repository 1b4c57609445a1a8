"""Locust: realistic 1000-event batches with a share of duplicates and invalid events.

MF_KEY=<ingest key> locust -f loadtest/locustfile.py --headless -u 8 -r 8 -t 30s --host http://127.0.0.1:3000
"""

from __future__ import annotations

import os
import random
import secrets

import orjson
from locust import FastHttpUser, between, task

from meterflow import samples

BATCH = int(os.environ.get("MF_LOAD_BATCH", "1000"))
DUPLICATE_SHARE = float(os.environ.get("MF_LOAD_DUPLICATES", "0.05"))
INVALID_SHARE = float(os.environ.get("MF_LOAD_INVALID", "0.01"))


class Ingest(FastHttpUser):
    wait_time = between(0, 0.05)

    def on_start(self) -> None:
        self.headers = {"Content-Type": "application/json", "Authorization": f"Bearer {os.environ['MF_KEY']}"}
        self.sent: list[dict[str, object]] = []
        self.rng = random.Random()
        self.run = secrets.token_hex(4)
        self.n = 0

    @task
    def post_batch(self) -> None:
        self.n += 1
        events = samples.batch(BATCH, seed=self.rng.randrange(1 << 30), prefix=f"lc{self.run}_{self.n}")
        for i in range(int(BATCH * DUPLICATE_SHARE)):
            if self.sent:
                events[i] = self.rng.choice(self.sent)  # sent before: must come back as a duplicate
        for i in range(int(BATCH * INVALID_SHARE)):
            events[-1 - i]["timestamp"] = "not a time"  # fails on its own, never the batch
        self.sent = events[-50:]
        with self.client.post("/v1/events", data=orjson.dumps({"events": events}), headers=self.headers,
                              catch_response=True) as r:  # fmt: skip
            if r.status_code != 200:
                r.failure(f"{r.status_code}: {r.text[:200]}")
