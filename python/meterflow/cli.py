"""The `meterflow` command: serve, worker, keys create, db upgrade, replay."""

from __future__ import annotations

import argparse
import asyncio
import os
import resource
import shutil
import sys
import tempfile
import time

from meterflow import config

FD_RESERVE = 1024  # descriptors kept for files, storage and Redis connections, the spool


def raise_fd_limit() -> int:
    """Raises this process's open-file limit to its hard limit (workers inherit it); returns it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError):
            pass  # keep the soft limit; the connection cap below follows it
    return soft


def connection_cap(settings: config.Settings, fd_limit: int) -> int:
    """Connections each worker serves at once (Granian's backpressure): the setting, or
    what the open-file limit leaves, so an accept never fails for want of a descriptor."""
    return max(64, min(settings.http_max_connections, (fd_limit - FD_RESERVE) // settings.workers))


def _serve(args: argparse.Namespace) -> int:
    overrides = {"host": args.host, "port": args.port, "workers": args.workers}
    try:
        settings = config.load(config_file=args.config, overrides=overrides)
    except config.ConfigError as e:
        print(f"meterflow: {e}", file=sys.stderr)
        return 2
    # Workers are separate processes that build their settings from the
    # environment: hand them exactly what was validated here.
    for name, value in overrides.items():
        if value is not None:
            os.environ[f"MF_{name.upper()}"] = str(value)
    if args.config:
        os.environ["MF_CONFIG"] = args.config
    # Each worker keeps its metrics in files here and /metrics sums them (prometheus_client's
    # multiprocess mode, chosen at its import: set before the workers exist). Fresh per server,
    # as two servers may share a data directory; removed when the server stops.
    metrics_dir = tempfile.mkdtemp(prefix="meterflow-metrics-")
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = metrics_dir
    from granian import Granian
    from granian.constants import Interfaces
    from granian.http import HTTP1Settings
    from granian.log import LogLevels

    cap = connection_cap(settings, raise_fd_limit())
    print(
        f"meterflow: serving on http://{settings.host}:{settings.port} "
        f"(storage={settings.storage}, dedup={settings.dedup}, workers={settings.workers}, "
        f"connections per worker={cap})",
        file=sys.stderr,
        flush=True,
    )
    try:
        Granian(
            "meterflow.api.app:app_factory",
            factory=True,
            interface=Interfaces.ASGI,
            address=settings.host,
            port=settings.port,
            workers=settings.workers,
            log_level=LogLevels(settings.log_level),
            # Idle connections hold a backpressure slot each: the cap is high. Once a
            # connection has sent a byte, or between keep-alive requests, no complete
            # header within the timeout closes it; one that never sends a byte is kept
            # (the proxy's job, README). The kernel caps the backlog at somaxconn.
            backlog=4096,
            backpressure=cap,
            http1_settings=HTTP1Settings(header_read_timeout=settings.http_header_timeout_s * 1000),
        ).serve()
    finally:
        shutil.rmtree(metrics_dir, ignore_errors=True)
    return 0


def _settings(args: argparse.Namespace) -> config.Settings | None:
    try:
        return config.load(config_file=getattr(args, "config", None))
    except config.ConfigError as e:
        print(f"meterflow: {e}", file=sys.stderr)
        return None


def _keys_create(args: argparse.Namespace) -> int:
    settings = _settings(args)
    if settings is None:
        return 2
    from meterflow.auth.keys import KeyError_, KeyStore
    from meterflow.records import RecordsUnavailable, open_records
    from meterflow.runtime import started

    async def run() -> str:
        records = open_records(settings)
        async with started(records):
            _, secret = await KeyStore(records).create(args.scope, args.name or "", args.customer_id)
            return secret

    try:
        secret = asyncio.run(run())
    except (RecordsUnavailable, KeyError_) as e:
        print(f"meterflow: cannot create the key: {e}", file=sys.stderr)
        return 1
    # The one time the secret is shown.
    print(secret)
    return 0


def _db_upgrade(args: argparse.Namespace) -> int:
    settings = _settings(args)
    if settings is None:
        return 2
    from meterflow.records import RecordsUnavailable, open_records

    async def run() -> str:
        records = open_records(settings)
        try:
            return await records.upgrade()
        finally:
            await records.close()

    try:
        revision = asyncio.run(run())
    except RecordsUnavailable as e:
        print(f"meterflow: cannot upgrade the records database: {e}", file=sys.stderr)
        return 1
    print(f"meterflow: records database ({settings.database_url.split('@')[-1] or 'sqlite'}) at revision {revision}")
    return 0


def _replay(args: argparse.Namespace) -> int:
    settings = _settings(args)
    if settings is None:
        return 2
    from meterflow.archive import ArchiveError, open_store
    from meterflow.archive.replay import parse_time, replay
    from meterflow.runtime import started
    from meterflow.storage import StorageError, open_storage

    try:
        start, end = parse_time(args.start), parse_time(args.end)
    except ValueError as e:
        print(f"meterflow: {e}", file=sys.stderr)
        return 2
    if end <= start:
        print("meterflow: --to must be after --from.", file=sys.stderr)
        return 2
    store = open_store(settings)
    if store is None:
        print("meterflow: MF_ARCHIVE=none: there is no archive to replay.", file=sys.stderr)
        return 2

    async def run() -> None:
        storage = None if args.dry_run else open_storage(settings)
        async with started(store, *([storage] if storage is not None else [])):
            await replay(store, storage, start, end, args.dry_run)

    try:
        asyncio.run(run())
    except (ArchiveError, StorageError, OSError, ValueError) as e:
        print(f"\nmeterflow: replay failed: {e}", file=sys.stderr)
        return 1
    return 0


def _worker_settings(args: argparse.Namespace) -> config.Settings | None:
    settings = _settings(args)
    if settings is not None and settings.dedup != "redis":
        print("meterflow: the worker needs MF_DEDUP=redis (the event stream lives in Redis).", file=sys.stderr)
        return None
    return settings


def _worker(args: argparse.Namespace) -> int:
    settings = _worker_settings(args)
    if settings is None:
        return 2
    if settings.storage != "clickhouse":
        print("meterflow: the worker needs MF_STORAGE=clickhouse, shared with the servers.", file=sys.stderr)
        return 2
    import signal

    from meterflow.archive import Spool, open_store
    from meterflow.ingest.dedup import RedisDedup
    from meterflow.ingest.worker import Worker
    from meterflow.logs import setup_logging
    from meterflow.metrics import Metrics
    from meterflow.runtime import started
    from meterflow.storage import open_storage

    setup_logging(settings)

    async def run() -> None:
        storage, dedup, archive, metrics = open_storage(settings), RedisDedup(settings), open_store(settings), Metrics()
        spool = Spool(settings, archive, metrics) if archive is not None else None
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        async with started(storage, dedup, *([archive] if archive is not None else [])):
            if spool is not None:
                spool.start()
            worker = Worker(settings, dedup.redis, storage, spool, metrics)
            print(f"meterflow: worker {worker.name} reading the event stream", file=sys.stderr, flush=True)
            try:
                # SIGTERM: the round in progress commits, then the worker stops.
                await worker.run(stop)
            finally:
                if spool is not None:
                    await spool.stop()
                    try:  # a last upload; what fails stays spooled
                        await asyncio.wait_for(spool.drain_once(), 10)
                    except Exception as e:
                        print(f"meterflow: archive left spooled at shutdown: {e}", file=sys.stderr)

    asyncio.run(run())
    return 0


def _worker_dead_letters(args: argparse.Namespace) -> int:
    settings = _worker_settings(args)
    if settings is None:
        return 2
    from redis.exceptions import RedisError

    from meterflow.ingest.stream import dead_letters, retry_dead_letters

    async def run() -> int:
        import redis.asyncio as aioredis

        r = aioredis.from_url(settings.redis_url, socket_timeout=5, socket_connect_timeout=3)
        try:
            if args.worker_command == "retry":
                moved = await retry_dead_letters(r, args.ids or None)
                print(f"meterflow: {moved} dead letters put back on the event stream")
                return 0
            letters = await dead_letters(r)
            for d in letters:
                print(f"{d['id']}  flush {d['flush_id']}  {d['events']} events  {d['attempts']} attempts  {d['error']}")
            print(f"meterflow: {len(letters)} dead letters", file=sys.stderr)
            return 0
        finally:
            await r.aclose()

    try:
        return asyncio.run(run())
    except (RedisError, OSError) as e:
        print(f"meterflow: Redis is unavailable: {e}", file=sys.stderr)
        return 1


def _invoices_close(args: argparse.Namespace) -> int:
    settings = _settings(args)
    if settings is None:
        return 2
    from meterflow.archive import open_store
    from meterflow.archive.replay import parse_time
    from meterflow.billing.closing import Closer
    from meterflow.billing.preview import NotInPeriod
    from meterflow.records import RecordsUnavailable
    from meterflow.runtime import ClosingRuntime
    from meterflow.storage import StorageError

    try:
        at = parse_time(args.at) if args.at else int(time.time() * 1000)
    except ValueError as e:
        print(f"meterflow: --at: {e}", file=sys.stderr)
        return 2

    def progress(done: int, total: int) -> None:
        bar = "#" * (30 * done // max(total, 1))
        sys.stderr.write(f"\rinvoices close [{bar:<30}] {done}/{total} periods")
        sys.stderr.flush()

    async def run() -> int:
        archive = open_store(settings)
        async with ClosingRuntime.opened(settings, archive) as rt:
            report = await Closer(rt).run(at, args.customer, progress)
        failed = f"; {report.failed} failed (see the log)" if report.failed else ""
        drafted = f", {report.drafted} drafted (in their grace)" if report.drafted else ""
        settled = (f"; settling made {report.credit_notes} credit notes and {report.late_invoices} invoices of "
                   "late lines only" if report.credit_notes or report.late_invoices else "")
        sys.stderr.write(f"\ninvoices close: {report.due} periods due; {report.closed} closed here{drafted}, "
                         f"{report.skipped} by another closer{settled}{failed}.\n")  # fmt: skip
        return 1 if report.failed else 0

    try:
        return asyncio.run(run())
    except (RecordsUnavailable, StorageError, NotInPeriod, LookupError, OSError) as e:
        print(f"\nmeterflow: closing failed: {e}", file=sys.stderr)
        return 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="meterflow", description="MeterFlow usage-based billing engine.")
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="run the HTTP server")
    serve.add_argument("--host", help="address to bind (MF_HOST, default 127.0.0.1)")
    serve.add_argument("--port", type=int, help="port (MF_PORT, default 3000)")
    serve.add_argument("--workers", type=int, help="worker processes (MF_WORKERS, default 1)")
    serve.add_argument("--config", help="TOML settings file (MF_CONFIG)")
    serve.set_defaults(func=_serve)
    keys = sub.add_parser("keys", help="manage API keys").add_subparsers(dest="keys_command", required=True)
    create = keys.add_parser("create", help="create an API key and print it (shown once)")
    create.add_argument("--scope", required=True, choices=["ingest", "read", "admin"])
    create.add_argument("--name", help="a label for the key")
    create.add_argument("--customer-id", help="bind an ingest key to one customer")
    create.add_argument("--config", help="TOML settings file (MF_CONFIG)")
    create.set_defaults(func=_keys_create)
    db = sub.add_parser("db", help="manage the records database").add_subparsers(dest="db_command", required=True)
    up = db.add_parser("upgrade", help="apply the records database's migrations (the server also does at start)")
    up.add_argument("--config", help="TOML settings file (MF_CONFIG)")
    up.set_defaults(func=_db_upgrade)
    rp = sub.add_parser("replay", help="read archived events of a time range back into storage")
    rp.add_argument("--from", dest="start", required=True, help="epoch ms or ISO 8601 (UTC)")
    rp.add_argument("--to", dest="end", required=True, help="epoch ms or ISO 8601 (UTC), exclusive")
    rp.add_argument("--dry-run", action="store_true", help="count what would be replayed; write nothing")
    rp.add_argument("--config", help="TOML settings file (MF_CONFIG)")
    rp.set_defaults(func=_replay)
    wk = sub.add_parser("worker", help="commit the async mode's event stream (run any number of them)")
    wk.add_argument("--config", help="TOML settings file (MF_CONFIG)")
    wk.set_defaults(func=_worker)
    wsub = wk.add_subparsers(dest="worker_command")
    dl = wsub.add_parser("dead-letters", help="list the entries that failed MF_WORKER_MAX_ATTEMPTS times")
    dl.add_argument("--config", help="TOML settings file (MF_CONFIG)")
    dl.set_defaults(func=_worker_dead_letters)
    rt = wsub.add_parser("retry", help="put dead letters (all, or the ids given) back on the event stream")
    rt.add_argument("ids", nargs="*", help="dead-letter entry ids (default: all)")
    rt.add_argument("--config", help="TOML settings file (MF_CONFIG)")
    rt.set_defaults(func=_worker_dead_letters)
    inv = sub.add_parser("invoices", help="invoices").add_subparsers(dest="invoices_command", required=True)
    close = inv.add_parser("close", help="invoice every subscription period that ended MF_INVOICE_GRACE_S ago")
    close.add_argument("--at", help="close as of this time: epoch ms or ISO 8601 (UTC); default now")
    close.add_argument("--customer", help="only this customer's subscriptions")
    close.add_argument("--config", help="TOML settings file (MF_CONFIG)")
    close.set_defaults(func=_invoices_close)
    args = parser.parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
