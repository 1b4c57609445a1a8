"""Real services for the tests and the benches: redis-server, clickhouse-server, PostgreSQL and Garage,
each a subprocess on a loopback port, probed until it answers."""

from __future__ import annotations

import asyncio
import inspect
import itertools
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import urllib.request
from collections.abc import Awaitable, Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import TypeVar

ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for(check: object, what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while time.monotonic() < deadline:
        try:
            if check():  # type: ignore[operator]
                return
        except Exception as e:
            last = e
        time.sleep(0.05)
    raise RuntimeError(f"{what} did not come up within {timeout}s: {last}")


async def until(check: Callable[[], bool | Awaitable[bool]], what: str, timeout: float = 30.0,
                every: float = 0.05) -> None:  # fmt: skip
    """Polls `check` (sync or async) until it is true; an AssertionError naming `what` at the deadline."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        done = check()
        if inspect.isawaitable(done):
            done = await done
        if done:
            return
        await asyncio.sleep(every)
    raise AssertionError(f"{what}: not within {timeout}s")


def http_ok(url: str) -> bool:
    with urllib.request.urlopen(url, timeout=1) as r:
        return bool(r.status == 200)


class Process:
    def __init__(self, argv: list[str], log: Path, env: Mapping[str, str] | None = None) -> None:
        self.argv = argv
        self.log = log
        self.env = dict(env) if env is not None else None
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        out = open(self.log, "ab")  # noqa: SIM115 - the child keeps it
        self.proc = subprocess.Popen(
            self.argv, stdout=out, stderr=subprocess.STDOUT, env=self.env, start_new_session=True
        )
        out.close()

    def send(self, sig: int) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, sig)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30) -> int | None:
        if self.proc is None:
            return None
        self.send(sig)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.send(signal.SIGKILL)
            return self.proc.wait(10)
        finally:
            self.proc = None

    def kill(self) -> None:
        self.stop(signal.SIGKILL)


class Service:
    """A server in a subprocess: `start` runs it and probes `ready` until it answers, `stop` ends it,
    `close` ends it for good (a service with files of its own removes them)."""

    name = "service"
    ready_timeout = 30.0
    stop_signal: int = signal.SIGTERM
    proc: Process

    def ready(self) -> bool:
        raise NotImplementedError

    def start(self) -> None:
        self.proc.start()
        wait_for(self.ready, self.name, self.ready_timeout)

    def stop(self) -> None:
        self.proc.stop(self.stop_signal)

    def close(self) -> None:
        self.stop()


S = TypeVar("S", bound=Service)


@contextmanager
def running(service: S) -> Iterator[S]:
    """`service` started for the block, closed after it: the lifecycle of every session fixture and script."""
    service.start()
    try:
        yield service
    finally:
        service.close()


def service_dir(workdir: Path, name: str) -> Path:
    path = workdir / name
    path.mkdir(parents=True, exist_ok=True)
    return path


def port_open(port: int) -> bool:
    with socket.create_connection(("127.0.0.1", port), 1):
        return True


# As the shipped configs: a bound, and writes refused (OOM) rather than keys evicted past it.
MAXMEMORY = "512mb"


class Redis(Service):
    name = "redis-server"

    def __init__(self, workdir: Path) -> None:
        self.port = free_port()
        self.dir = service_dir(workdir, "redis")
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.proc = Process(
            [shutil.which("redis-server") or "redis-server", "--port", str(self.port), "--bind", "127.0.0.1",
             "--dir", str(self.dir), "--save", "", "--appendonly", "yes", "--appendfsync", "always",
             "--maxmemory", MAXMEMORY, "--maxmemory-policy", "noeviction", "--daemonize", "no"],
            self.dir / "redis.log",
        )  # fmt: skip

    def command(self, line: bytes, answer: bytes) -> bool:
        with socket.create_connection(("127.0.0.1", self.port), 2) as s:
            s.sendall(line + b"\r\n")
            return s.recv(16).startswith(answer)

    def ready(self) -> bool:
        return self.command(b"PING", b"+PONG")


def flush_redis(redis: Redis) -> None:
    assert redis.command(b"FLUSHALL", b"+OK")


CLICKHOUSE_CONFIG = """<?xml version="1.0"?>
<yandex>
    <logger><level>warning</level><log>{dir}/server.log</log><errorlog>{dir}/server.err.log</errorlog><size>10M</size><count>1</count></logger>
    <http_port>{http}</http_port>
    <tcp_port>{tcp}</tcp_port>
    <listen_host>127.0.0.1</listen_host>
    <max_connections>256</max_connections>
    <keep_alive_timeout>10</keep_alive_timeout>
    <max_concurrent_queries>100</max_concurrent_queries>
    <uncompressed_cache_size>268435456</uncompressed_cache_size>
    <mark_cache_size>268435456</mark_cache_size>
    <path>{dir}/data/</path>
    <tmp_path>{dir}/tmp/</tmp_path>
    <user_files_path>{dir}/user_files/</user_files_path>
    <format_schema_path>{dir}/format_schemas/</format_schema_path>
    <users_config>{dir}/users.xml</users_config>
    <default_profile>default</default_profile>
    <default_database>default</default_database>
    <timezone>UTC</timezone>
    <mlock_executable>false</mlock_executable>
</yandex>
"""

CLICKHOUSE_USERS = """<?xml version="1.0"?>
<yandex>
    <profiles><default><max_memory_usage>4000000000</max_memory_usage></default></profiles>
    <users><default><password></password><networks><ip>127.0.0.1</ip><ip>::1</ip></networks>
        <profile>default</profile><quota>default</quota></default>
        <meterflow><password>mf-secret</password><networks><ip>127.0.0.1</ip><ip>::1</ip></networks>
        <profile>default</profile><quota>default</quota></meterflow></users>
    <quotas><default><interval><duration>3600</duration><queries>0</queries><errors>0</errors>
        <result_rows>0</result_rows><read_rows>0</read_rows><execution_time>0</execution_time></interval></default></quotas>
</yandex>
"""


class ClickHouse(Service):
    name = "clickhouse-server"
    ready_timeout = 60.0

    def __init__(self, workdir: Path) -> None:
        self.http_port = free_port()
        self.dir = service_dir(workdir, "clickhouse")
        self.url = f"http://127.0.0.1:{self.http_port}"
        cfg = self.dir / "config.xml"
        cfg.write_text(CLICKHOUSE_CONFIG.format(dir=self.dir, http=self.http_port, tcp=free_port()))
        (self.dir / "users.xml").write_text(CLICKHOUSE_USERS)
        binary = shutil.which("clickhouse-server") or shutil.which("clickhouse") or "clickhouse-server"
        argv = [binary, f"--config-file={cfg}"]
        if binary.endswith("/clickhouse"):
            argv = [binary, "server", f"--config-file={cfg}"]
        self.proc = Process(argv, self.dir / "stdout.log")

    def ready(self) -> bool:
        return http_ok(self.url + "/?query=SELECT%201")

    def query(self, sql: str) -> str:
        req = urllib.request.Request(self.url + "/", data=sql.encode(), method="POST")
        with urllib.request.urlopen(req, timeout=30) as r:
            return str(r.read().decode())

    def reset_database(self, name: str) -> None:
        self.query(f"DROP DATABASE IF EXISTS {name}")
        self.query(f"CREATE DATABASE {name}")


def postgres_bin() -> Path:
    """Debian's PostgreSQL binaries (`postgresql` package): the newest major version installed."""
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"), key=lambda p: int(p.parent.parent.name))
    assert found, "PostgreSQL is not installed: run `make services` (Debian's postgresql package)"
    return found[-1].parent


class PostgreSQL(Service):
    """A private PostgreSQL cluster: initdb in a temp dir, one server on a loopback port.
    PostgreSQL refuses to run as root: as root it runs as the `postgres` user."""

    name = "postgresql"
    ready_timeout = 60.0
    # SIGINT: PostgreSQL's fast shutdown (SIGTERM would wait for every client to leave).
    stop_signal = signal.SIGINT

    def __init__(self) -> None:
        self.bin = postgres_bin()
        self.port = free_port()
        # Not under pytest's tmp dir, which only root may enter.
        self.dir = Path(tempfile.mkdtemp(prefix="meterflow-pg-"))
        self.data = self.dir / "data"
        self.as_user: list[str] = []
        if os.geteuid() == 0:
            pw = pwd.getpwnam("postgres")
            os.chown(self.dir, pw.pw_uid, pw.pw_gid)
            self.as_user = ["runuser", "-u", "postgres", "--"]
        subprocess.run(
            [*self.as_user, str(self.bin / "initdb"), "-D", str(self.data), "-U", "postgres", "--auth=trust",
             "-E", "UTF8", "--no-sync"],
            check=True, capture_output=True, timeout=120,
        )  # fmt: skip
        argv = [*self.as_user, str(self.bin / "postgres"), "-D", str(self.data), "-p", str(self.port),
                "-k", str(self.dir), "-c", "listen_addresses=127.0.0.1", "-c", "fsync=off",
                "-c", "synchronous_commit=off", "-c", "full_page_writes=off", "-c", "max_connections=300"]  # fmt: skip
        self.proc = Process(argv, self.dir / "postgres.log")
        self._db_seq = itertools.count(1)

    def url(self, database: str = "postgres") -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{database}"

    def ready(self) -> bool:
        out = subprocess.run([str(self.bin / "pg_isready"), "-h", "127.0.0.1", "-p", str(self.port), "-q"],
                             timeout=10)  # fmt: skip
        return out.returncode == 0

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)

    def new_database(self) -> str:
        """A fresh empty database; returns its URL."""
        name = f"mf_test_{next(self._db_seq)}"
        subprocess.run([str(self.bin / "createdb"), "-h", "127.0.0.1", "-p", str(self.port), "-U", "postgres", name],
                       check=True, capture_output=True, timeout=60)  # fmt: skip
        return self.url(name)


def garage_binary() -> str | None:
    cached = Path.home() / ".cache/meterflow/garage/bin/garage"
    return shutil.which("garage") or (str(cached) if cached.exists() else None)


class Garage(Service):
    """Garage, the S3-compatible store: one node, a layout, a key allowed to create buckets."""

    name = "garage"
    ready_timeout = 60.0
    region = "garage"

    def __init__(self, workdir: Path) -> None:
        binary = garage_binary()
        assert binary, "garage is not built: run `make garage` (cargo install garage, cached)"
        self.binary = binary
        self.dir = service_dir(workdir, "garage")
        self.s3_port, self.rpc_port, self.admin_port = free_port(), free_port(), free_port()
        self.endpoint = f"http://127.0.0.1:{self.s3_port}"
        self.config = self.dir / "garage.toml"
        self.config.write_text(
            f"""metadata_dir = "{self.dir}/meta"
data_dir = "{self.dir}/data"
db_engine = "sqlite"
replication_factor = 1
rpc_bind_addr = "127.0.0.1:{self.rpc_port}"
rpc_public_addr = "127.0.0.1:{self.rpc_port}"
rpc_secret = "{os.urandom(32).hex()}"

[s3_api]
s3_region = "{self.region}"
api_bind_addr = "127.0.0.1:{self.s3_port}"
root_domain = ".s3.garage.localhost"

[admin]
api_bind_addr = "127.0.0.1:{self.admin_port}"
admin_token = "{os.urandom(16).hex()}"
"""
        )
        self.proc = Process([binary, "-c", str(self.config), "server"], self.dir / "garage.log",
                            {**os.environ, "RUST_LOG": "warn"})  # fmt: skip
        self.access_key = ""
        self.secret_key = ""

    def cli(self, *args: str) -> str:
        out = subprocess.run([self.binary, "-c", str(self.config), *args], capture_output=True, text=True,
                             timeout=60, env={**os.environ, "RUST_LOG": "warn"})  # fmt: skip
        if out.returncode != 0:
            raise RuntimeError(f"garage {' '.join(args)}: {out.stderr.strip()[-500:]}")
        return out.stdout

    def ready(self) -> bool:
        return port_open(self.s3_port)

    def start(self) -> None:
        super().start()
        if not self.access_key:
            node = ""

            def has_node() -> bool:
                nonlocal node
                node = self.cli("node", "id", "-q").strip().split("@")[0]
                return bool(node)

            wait_for(has_node, "garage node id", 30)
            self.cli("layout", "assign", "-z", "dc1", "-c", "1G", node)
            self.cli("layout", "apply", "--version", "1")
            info = self.cli("key", "create", "meterflow-test")
            self.access_key = info.split("Key ID:")[1].split()[0]
            self.secret_key = info.split("Secret key:")[1].split()[0]
            self.cli("key", "allow", "--create-bucket", "meterflow-test")

    def env(self, bucket: str) -> dict[str, str]:
        return {"MF_ARCHIVE": "s3", "MF_S3_ENDPOINT": self.endpoint, "MF_S3_BUCKET": bucket,
                "MF_S3_REGION": self.region, "MF_S3_ACCESS_KEY": self.access_key,
                "MF_S3_SECRET_KEY": self.secret_key}  # fmt: skip
