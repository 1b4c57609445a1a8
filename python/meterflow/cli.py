"""The `meterflow` command: arguments parsed and answers printed; `runtime` opens what each command needs."""

from __future__ import annotations

import argparse
import asyncio
import os
import resource
import shutil
import sys
import tempfile
from typing import Any

from meterflow import config
from meterflow.auth.keys import SCOPES
from meterflow.kernel.calendar import parse_time
from meterflow.kernel.clock import now_ms
from meterflow.kernel.errors import CommandFailed

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
    # Each worker keeps its metrics in files here and /metrics sums them (prometheus_client's
    # multiprocess mode, chosen at its first import: set before anything imports it, as the forked
    # workers inherit the mode). Fresh per server, as two servers may share a data directory;
    # removed when the server stops.
    metrics_dir = tempfile.mkdtemp(prefix="meterflow-metrics-")
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = metrics_dir
    try:
        return _serve_granian(args)
    finally:
        shutil.rmtree(metrics_dir, ignore_errors=True)
        os.environ.pop("PROMETHEUS_MULTIPROC_DIR", None)


def _serve_granian(args: argparse.Namespace) -> int:
    overrides = {"host": args.host, "port": args.port, "workers": args.workers}
    settings = _settings(args, overrides)
    # Workers are separate processes that build their settings from the
    # environment: hand them exactly what was validated here.
    for name, value in overrides.items():
        if value is not None:
            os.environ[f"MF_{name.upper()}"] = str(value)
    if args.config:
        os.environ["MF_CONFIG"] = args.config
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
    Granian(
        "meterflow.app:app_factory",
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
    return 0


class Refused(Exception):
    """The command cannot start as asked (exit 2): a bad setting or argument; the text says which."""


def _settings(args: argparse.Namespace, overrides: dict[str, Any] | None = None) -> config.Settings:
    """The settings, every table checked (`[[meters]]`, `[[plans]]`), or Refused."""
    from meterflow import runtime  # imported when a command runs: see _serve

    try:
        settings = config.load(config_file=getattr(args, "config", None), overrides=overrides)
        runtime.check_settings(settings)
    except config.ConfigError as e:
        raise Refused(str(e)) from None
    return settings


def _time(text: str, what: str = "") -> int:
    try:
        return parse_time(text)
    except ValueError as e:
        raise Refused(f"{what}{e}") from None


def _keys_create(args: argparse.Namespace) -> int:
    from meterflow import runtime

    settings = _settings(args)
    print(asyncio.run(runtime.create_key(settings, args.scope, args.name or "", args.customer_id)))  # shown once
    return 0


def _db_upgrade(args: argparse.Namespace) -> int:
    from meterflow import runtime

    settings = _settings(args)
    revision = asyncio.run(runtime.upgrade_records(settings))
    print(f"meterflow: records database ({settings.database_url.split('@')[-1] or 'sqlite'}) at revision {revision}")
    return 0


def _replay(args: argparse.Namespace) -> int:
    from meterflow import runtime

    settings = _settings(args)
    start, end = _time(args.start), _time(args.end)
    if end <= start:
        raise Refused("--to must be after --from.")
    if settings.archive == "none":
        raise Refused("MF_ARCHIVE=none: there is no archive to replay.")
    asyncio.run(runtime.replay_archive(settings, start, end, args.dry_run))
    return 0


def _worker_settings(args: argparse.Namespace) -> config.Settings:
    settings = _settings(args)
    if settings.dedup != "redis":
        raise Refused("the worker needs MF_DEDUP=redis (the event stream lives in Redis).")
    return settings


def _worker(args: argparse.Namespace) -> int:
    from meterflow import runtime

    settings = _worker_settings(args)
    if settings.storage != "clickhouse":
        raise Refused("the worker needs MF_STORAGE=clickhouse, shared with the servers.")
    asyncio.run(runtime.run_worker(settings, lambda line: print(f"meterflow: {line}", file=sys.stderr, flush=True)))
    return 0


def _worker_dead_letters(args: argparse.Namespace) -> int:
    from meterflow import runtime

    settings = _worker_settings(args)
    if args.worker_command == "retry":
        moved = asyncio.run(runtime.retry_dead_letters_of(settings, args.ids))
        print(f"meterflow: {moved} dead letters put back on the event stream")
        return 0
    letters = asyncio.run(runtime.list_dead_letters(settings))
    for d in letters:
        print(f"{d['id']}  flush {d['flush_id']}  {d['events']} events  {d['attempts']} attempts  {d['error']}")
    print(f"meterflow: {len(letters)} dead letters", file=sys.stderr)
    return 0


def _invoices_close(args: argparse.Namespace) -> int:
    from meterflow import runtime

    settings = _settings(args)
    at = _time(args.at, "--at: ") if args.at else now_ms()

    def progress(done: int, total: int) -> None:
        bar = "#" * (30 * done // max(total, 1))
        sys.stderr.write(f"\rinvoices close [{bar:<30}] {done}/{total} periods")
        sys.stderr.flush()

    report = asyncio.run(runtime.close_invoices(settings, at, args.customer, progress))
    failed = f"; {report.failed} failed (see the log)" if report.failed else ""
    drafted = f", {report.drafted} drafted (in their grace)" if report.drafted else ""
    settled = (f"; settling made {report.credit_notes} credit notes and {report.late_invoices} invoices of "
               "late lines only" if report.credit_notes or report.late_invoices else "")
    sys.stderr.write(f"\ninvoices close: {report.due} periods due; {report.closed} closed here{drafted}, "
                     f"{report.skipped} by another closer{settled}{failed}.\n")  # fmt: skip
    return 1 if report.failed else 0


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
    create.add_argument("--scope", required=True, choices=SCOPES)
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
    try:
        return int(args.func(args))
    except Refused as e:
        print(f"meterflow: {e}", file=sys.stderr)
        return 2
    except CommandFailed as e:
        print(f"{chr(10) if e.after_progress else ''}meterflow: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
