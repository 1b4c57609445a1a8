"""The `meterflow` command: serve."""

from __future__ import annotations

import argparse
import os
import sys

from meterflow import config


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
    from granian import Granian
    from granian.constants import Interfaces
    from granian.log import LogLevels

    print(
        f"meterflow: serving on http://{settings.host}:{settings.port} "
        f"(storage={settings.storage}, dedup={settings.dedup}, workers={settings.workers})",
        file=sys.stderr,
        flush=True,
    )
    Granian(
        "meterflow.api.app:app_factory",
        factory=True,
        interface=Interfaces.ASGI,
        address=settings.host,
        port=settings.port,
        workers=settings.workers,
        log_level=LogLevels(settings.log_level),
        backlog=2048,
    ).serve()
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="meterflow", description="MeterFlow usage-based billing engine.")
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="run the HTTP server")
    serve.add_argument("--host", help="address to bind (MF_HOST, default 127.0.0.1)")
    serve.add_argument("--port", type=int, help="port (MF_PORT, default 3000)")
    serve.add_argument("--workers", type=int, help="worker processes (MF_WORKERS, default 1)")
    serve.add_argument("--config", help="TOML settings file (MF_CONFIG)")
    serve.set_defaults(func=_serve)
    args = parser.parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
