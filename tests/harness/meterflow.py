"""MeterFlow itself in subprocesses, as a user runs it: `meterflow serve` and `meterflow worker`."""

from __future__ import annotations

import itertools
import os
import signal
import sys
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import ClassVar, Generic, TypeVar

from tests.harness.backends import Backend
from tests.harness.processes import Process, free_port, http_ok, wait_for

# The fixed admin key of test servers (MF_ADMIN_KEY); keys the tests create are random.
TEST_ADMIN_KEY = "mf_TestAdmin001" + "x" * 32

# Webhook receivers are loopback servers the tests start: http for 127.0.0.1, and its address allowed.
WEBHOOKS_TO_LOOPBACK = {"MF_WEBHOOK_ALLOW_HTTP_HOSTS": "127.0.0.1", "MF_WEBHOOK_ALLOW_ADDRESSES": "127.0.0.1/32"}

# Async mode as the tests run it: dead workers' entries claimed after half a second.
ASYNC = {"MF_INGEST_MODE": "async", "MF_WORKER_CLAIM_IDLE_MS": "500", "MF_FLUSH_TIMEOUT_S": "2"}


def meterflow_env(env: Mapping[str, str], **own: str) -> dict[str, str]:
    """This process's environment without its MF_ settings, then `own`, then `env`."""
    full = {k: v for k, v in os.environ.items() if not k.startswith("MF_")}
    full.update(own)
    full.update(env)
    return full


class _MeterFlowProcess:
    """A `meterflow` command in a subprocess: its process and its log."""

    command: ClassVar[str]
    proc: Process
    log: Path
    env: dict[str, str]

    def _process(self, env: dict[str, str]) -> None:
        self.env = env
        self.proc = Process([sys.executable, "-m", "meterflow.cli", self.command], self.log, env)

    def stop(self, sig: int = signal.SIGTERM) -> int | None:
        return self.proc.stop(sig)

    def kill(self) -> None:
        self.proc.kill()

    def logs(self) -> str:
        return self.log.read_text() if self.log.exists() else ""


class MeterFlowServer(_MeterFlowProcess):
    """`meterflow serve` in a subprocess, as a user runs it."""

    command = "serve"
    auth: ClassVar[dict[str, str]] = {"Authorization": f"Bearer {TEST_ADMIN_KEY}"}

    def __init__(self, workdir: Path, env: Mapping[str, str]) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.workdir = workdir
        self.log = workdir / f"meterflow-{self.port}.log"
        self._process(meterflow_env(env, MF_PORT=str(self.port), MF_LOG_LEVEL="info", MF_ADMIN_KEY=TEST_ADMIN_KEY))

    def start(self, timeout: float = 60) -> None:
        self.proc.start()

        def up() -> bool:
            assert self.proc.proc is not None
            if self.proc.proc.poll() is not None:
                raise RuntimeError(f"meterflow exited: {self.log.read_text()[-2000:]}")
            return http_ok(self.url + "/health")

        wait_for(up, "meterflow", timeout)


class MeterFlowWorker(_MeterFlowProcess):
    """`meterflow worker` in a subprocess (async mode), as a user runs it."""

    command = "worker"
    _seq = itertools.count(1)

    def __init__(self, workdir: Path, env: Mapping[str, str]) -> None:
        self.log = workdir / f"worker-{next(self._seq)}.log"
        self._process(meterflow_env(env, MF_LOG_LEVEL="info"))

    def start(self) -> None:
        self.proc.start()
        wait_for(lambda: "reading the event stream" in self.logs(), "meterflow worker")


P = TypeVar("P", MeterFlowServer, MeterFlowWorker)


class Starter(Generic[P]):
    """Starts `meterflow` processes of one kind on a backend's environment (plus `base` and a call's own
    settings); every one it started is stopped (SIGTERM) when its block ends."""

    def __init__(self, kind: type[P], workdir: Path, base: Mapping[str, str] | None = None) -> None:
        self.kind, self.workdir, self.base = kind, workdir, dict(base or {})
        self.started: list[P] = []

    def __call__(self, backend: Backend, **env: str) -> P:
        p = self.kind(self.workdir, {**backend.env, **self.base, **env})
        p.start()
        self.started.append(p)
        return p


@contextmanager
def starting(kind: type[P], workdir: Path, base: Mapping[str, str] | None = None) -> Iterator[Starter[P]]:
    """A `Starter` for the block: the `start_server` and `start_worker` fixtures."""
    starter = Starter(kind, workdir, base)
    try:
        yield starter
    finally:
        for p in starter.started:
            p.stop()
