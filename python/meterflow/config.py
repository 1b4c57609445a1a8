"""Settings: one typed object from `MF_*` environment variables and an optional TOML file."""

from __future__ import annotations

import dataclasses
import ipaddress
import os
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Literal, get_args, get_type_hints

from babel import Locale, UnknownLocaleError

from meterflow.kernel.rust import Limits

CORE_LIMITS = Limits()
BOOLEANS = {"true": True, "1": True, "yes": True, "on": True, "false": False, "0": False, "no": False, "off": False}
# An origin: scheme, host (a name or an IPv4/[IPv6] address) and an optional port; a trailing slash is allowed.
PUBLIC_URL_RE = re.compile(r"https?://(?:[A-Za-z0-9.-]+|\[[0-9A-Fa-f:.]+\])(?::[0-9]{1,5})?/?")


class ConfigError(Exception):
    """A setting is wrong or missing; the message is one line naming it."""


@dataclass(frozen=True)
class Settings:
    """Every setting, with its default. Env: `MF_<NAME>`; TOML: `<name> = ...`."""

    host: str = "127.0.0.1"
    port: int = 3000
    workers: int = 1
    storage: Literal["chdb", "clickhouse"] = "chdb"
    data_dir: str = "./data"
    clickhouse_url: str = "http://127.0.0.1:8123"
    clickhouse_database: str = "default"
    clickhouse_user: str = "default"
    clickhouse_password: str = ""
    dedup: Literal["memory", "redis"] = "memory"
    redis_url: str = "redis://127.0.0.1:6379/0"
    # The records database (customers, keys, meters): empty = SQLite at data_dir/meterflow.db.
    database_url: str = ""
    # How long a cached API key keeps working while the records database is unreachable.
    key_cache_grace_s: int = 60
    dedup_window_s: int = 31 * 86_400
    flush_timeout_s: int = 30
    flush_max_rows: int = 10_000
    flush_max_wait_ms: int = 50
    flush_queue_max_rows: int = 200_000
    flush_concurrency: int = 2
    # sync: answer 200 once stored; async: answer 202 once queued in a Redis
    # Stream that `meterflow worker` processes commit (full stack only).
    ingest_mode: Literal["sync", "async"] = "sync"
    stream_max_entries: int = 100_000
    # The bytes of events the stream may hold (past them: 503 overloaded); keep Redis's maxmemory well above.
    stream_max_bytes: int = 256 * 1024 * 1024
    worker_claim_idle_ms: int = 30_000
    worker_max_attempts: int = 5
    # The bytes of events one worker round reads (one entry at least, however large).
    worker_round_max_bytes: int = 64 * 1024 * 1024
    max_body_bytes: int = 5 * 1024 * 1024
    # Connections: at most this many per worker (fewer if the open-file limit says so);
    # a begun header, or the idle time after a request, that brings no complete header
    # within the timeout closes the connection (Granian's timer starts at the first
    # byte: silent connections need the proxy); a body past its timeout answers 408.
    http_max_connections: int = 16_384
    http_header_timeout_s: int = 5
    http_body_timeout_s: int = 10
    # An event batch's limits: the Rust core's own defaults (1000 events, 5 minutes ahead, 30 days old).
    max_events: int = CORE_LIMITS.max_events
    max_future_ms: int = CORE_LIMITS.max_future_ms
    max_age_ms: int = CORE_LIMITS.max_age_ms
    retry_after_s: int = 1
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    log_format: Literal["json", "text"] = "json"
    # A fixed admin key accepted besides the stored ones (deployments, tests).
    admin_key: str = ""
    rate_requests_per_s: int = 100
    rate_requests_burst: int = 200
    rate_events_per_s: int = 100_000
    rate_events_burst: int = 200_000
    # Unknown or revoked keys a client address may send a minute before it waits (429).
    auth_failures_per_minute: int = 20
    # Where a trusted reverse proxy puts the client's address (e.g. x-real-ip); empty: the socket's peer.
    client_address_header: str = ""
    # Where users reach this server, as an origin (https://billing.example.com): redirects are built
    # from it; empty: redirects are relative. Never the request's Host header.
    public_url: str = ""
    # The dashboard cookie: always `Secure` (and every answer through the app carries HSTS for
    # hsts_max_age_s) when true; when false, `Secure` only for requests that came over HTTPS.
    cookie_secure: bool = False
    hsts_max_age_s: int = 31_536_000
    # A dashboard session ends this long after sign-in, at sign-out, or when its key is revoked.
    dashboard_session_s: int = 12 * 3600
    # A subscription may start at most this many days before now (each past period is invoiced at once).
    subscription_max_backdate_days: int = 400
    archive: Literal["none", "directory", "s3"] = "directory"
    s3_endpoint: str = "http://127.0.0.1:3900"
    s3_bucket: str = "meterflow-archive"
    s3_region: str = "garage"
    s3_access_key: str = ""
    s3_secret_key: str = ""
    spool_max_bytes: int = 1 << 30
    usage_max_period_days: int = 400
    usage_max_windows: int = 10_000
    # What one usage read may ask and cost (every usage query runs under these).
    usage_max_filter_values: int = 100
    usage_max_execution_s: int = 10
    usage_max_query_bytes: int = 262_144
    usage_max_result_rows: int = 100_000
    usage_max_concurrent_queries: int = 4
    # Invoices fall due this many days after they are issued; a period is closed this long after its end,
    # by a pass of every worker each invoice_close_interval_s.
    invoice_due_days: int = 30
    invoice_grace_s: int = 3600
    # Invoice documents: the seller's name and address lines (separated by "|"), and the locale of
    # their numbers, money and dates (a CLDR name such as en_US, de_DE, fr_FR).
    invoice_seller_name: str = "MeterFlow"
    invoice_seller_address: str = ""
    invoice_locale: str = "en_US"
    invoice_close_interval_s: int = 60
    # Settling every customer's finalized periods (late usage, corrections) runs at most this often per
    # closer; changes dated in the past and periods finalized meanwhile are settled on every pass.
    invoice_settle_interval_s: int = 3600
    # Webhook retries: the first after webhook_backoff_ms, doubling up to webhook_backoff_max_ms,
    # given up webhook_retry_for_s after the event; each attempt waits webhook_timeout_ms at most.
    webhook_backoff_ms: int = 5_000
    webhook_backoff_max_ms: int = 3_600_000
    webhook_retry_for_s: int = 86_400
    webhook_timeout_ms: int = 10_000
    webhook_poll_ms: int = 1_000
    # Webhook receivers: https only, except for these hosts (comma-separated names or IP literals); and
    # public addresses only, except those in these CIDRs or addresses, or of these host names.
    webhook_allow_http_hosts: str = ""
    webhook_allow_addresses: str = ""
    # Endpoints a worker's sender delivers to at once (each endpoint's deliveries go one after another).
    webhook_concurrency: int = 8
    # Meters defined as code (TOML `[[meters]]`), as written: `metering.meters.configured_meters` parses
    # them (the seed's catalog when None).
    meters: tuple[dict[str, Any], ...] | None = None
    # Plans defined as code (TOML `[[plans]]`), as written: `billing.plans.configured_plans` parses them
    # against the config's meters; read-only through the API.
    plans: tuple[dict[str, Any], ...] = ()
    # The TOML file the settings were read from (`MF_CONFIG`), named in the errors of its tables.
    config: str = ""

    def __post_init__(self) -> None:
        positive = (
            "workers", "dedup_window_s", "flush_timeout_s", "flush_max_rows", "flush_max_wait_ms",
            "flush_queue_max_rows", "flush_concurrency", "max_body_bytes", "max_events",
            "retry_after_s", "usage_max_period_days", "usage_max_windows", "rate_requests_per_s",
            "rate_requests_burst", "rate_events_per_s", "rate_events_burst", "spool_max_bytes",
            "usage_max_filter_values", "usage_max_execution_s", "usage_max_query_bytes", "usage_max_result_rows",
            "usage_max_concurrent_queries", "auth_failures_per_minute", "http_max_connections",
            "http_body_timeout_s", "key_cache_grace_s", "stream_max_entries", "worker_claim_idle_ms",
            "worker_max_attempts", "stream_max_bytes", "worker_round_max_bytes",
            "invoice_due_days", "invoice_close_interval_s",
            "invoice_settle_interval_s",
            "webhook_backoff_ms",
            "webhook_backoff_max_ms", "webhook_retry_for_s", "webhook_timeout_ms", "webhook_poll_ms",
            "webhook_concurrency", "hsts_max_age_s", "dashboard_session_s", "subscription_max_backdate_days",
        )  # fmt: skip
        for name in positive:
            if getattr(self, name) <= 0:
                raise ConfigError(f"MF_{name.upper()} must be a positive integer, got {getattr(self, name)}.")
        try:
            Locale.parse(self.invoice_locale)
        except (ValueError, UnknownLocaleError):
            shown = self.invoice_locale[:40]
            raise ConfigError(f"MF_INVOICE_LOCALE {shown!r} is not a locale such as en_US or de_DE.") from None
        if self.invoice_grace_s < 0:
            raise ConfigError(f"MF_INVOICE_GRACE_S must be 0 or more, got {self.invoice_grace_s}.")
        if not 1 <= self.http_header_timeout_s <= 60:
            raise ConfigError(f"MF_HTTP_HEADER_TIMEOUT_S must be from 1 to 60, got {self.http_header_timeout_s}.")
        if not 1 <= self.port <= 65535:
            raise ConfigError(f"MF_PORT must be from 1 to 65535, got {self.port}.")
        if self.max_future_ms < 0 or self.max_age_ms <= 0:
            raise ConfigError("MF_MAX_FUTURE_MS must be >= 0 and MF_MAX_AGE_MS > 0.")
        if self.dedup == "memory" and self.workers > 1:
            raise ConfigError(
                "MF_DEDUP=memory keeps the dedup index in one process; use MF_WORKERS=1 or MF_DEDUP=redis."
            )
        if self.ingest_mode == "async" and (self.dedup != "redis" or self.storage != "clickhouse"):
            raise ConfigError(
                "MF_INGEST_MODE=async needs the full stack: MF_DEDUP=redis (the stream) and "
                "MF_STORAGE=clickhouse (shared with `meterflow worker`)."
            )
        if self.storage == "chdb" and self.workers > 1:
            raise ConfigError(
                "MF_STORAGE=chdb admits one process per data directory; use MF_WORKERS=1 or MF_STORAGE=clickhouse."
            )
        db_scheme = self.database_url.split("://", 1)[0].split("+")[0] if "://" in self.database_url else ""
        if self.database_url and db_scheme not in ("sqlite", "postgresql", "postgres"):
            shown = self.database_url.split("@")[-1]
            raise ConfigError(f"MF_DATABASE_URL must start with sqlite:/// or postgresql://, got {shown!r}.")
        if self.workers > 1 and db_scheme not in ("postgresql", "postgres"):
            raise ConfigError(
                "MF_WORKERS > 1 needs MF_DATABASE_URL=postgresql://...: SQLite records admit one process."
            )
        if self.dedup_window_s * 1000 < self.max_age_ms + self.max_future_ms:
            raise ConfigError(
                "MF_DEDUP_WINDOW_S must cover MF_MAX_AGE_MS + MF_MAX_FUTURE_MS, or an old duplicate could pass."
            )
        if self.admin_key and not (self.admin_key.startswith("mf_") and len(self.admin_key) == 47
                                   and self.admin_key[3:].isalnum()):  # fmt: skip
            raise ConfigError("MF_ADMIN_KEY must look like a MeterFlow key: mf_ and 44 letters or digits.")
        if self.archive == "s3" and not (self.s3_access_key and self.s3_secret_key):
            raise ConfigError("MF_ARCHIVE=s3 needs MF_S3_ACCESS_KEY and MF_S3_SECRET_KEY.")
        try:
            allowed_addresses(self.webhook_allow_addresses)
        except ValueError as e:
            raise ConfigError(f"MF_WEBHOOK_ALLOW_ADDRESSES: {e}.") from None
        if self.public_url and not PUBLIC_URL_RE.fullmatch(self.public_url):
            raise ConfigError(
                f"MF_PUBLIC_URL must be an origin such as https://billing.example.com (no path, query or "
                f"credentials), got {self.public_url[:100]!r}."
            )
        for url_name in ("clickhouse_url", "redis_url", "s3_endpoint"):
            url = getattr(self, url_name)
            scheme = url.split("://", 1)[0]
            if "://" not in url or scheme not in ("http", "https", "redis", "rediss", "unix"):
                raise ConfigError(f"MF_{url_name.upper()} is not a URL: {url!r}.")

    @property
    def embedded(self) -> bool:
        return self.storage == "chdb"

    def public(self) -> dict[str, Any]:
        """The settings without secrets, for logs and /ready."""
        d = dataclasses.asdict(self)
        d["clickhouse_password"] = "***" if self.clickhouse_password else ""
        d["admin_key"] = "***" if self.admin_key else ""
        d["database_url"] = _without_password(self.database_url)
        d["s3_secret_key"] = "***" if self.s3_secret_key else ""
        d["meters"] = None if self.meters is None else [m.get("code") for m in self.meters]
        d["plans"] = [p.get("code") for p in self.plans]
        return d


def host_list(text: str) -> frozenset[str]:
    """A comma-separated list of host names, lower case, without a trailing dot."""
    return frozenset(e.strip().lower().rstrip(".") for e in text.split(",") if e.strip())


def allowed_addresses(text: str) -> tuple[tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...], frozenset[str]]:
    """MF_WEBHOOK_ALLOW_ADDRESSES: comma-separated addresses or CIDRs, and host names; ValueError names a bad one."""
    networks: list[ipaddress.IPv4Network | ipaddress.IPv6Network] = []
    hosts: list[str] = []
    for entry in (e.strip().lower() for e in text.split(",")):
        if not entry:
            continue
        try:
            networks.append(ipaddress.ip_network(entry, strict=False))
        except ValueError:
            if not re.fullmatch(r"[a-z0-9]([a-z0-9.-]*[a-z0-9])?\.?", entry):
                raise ValueError(f"{entry[:60]!r} is neither an address, a CIDR nor a host name") from None
            hosts.append(entry)
    return tuple(networks), host_list(",".join(hosts))


def _without_password(url: str) -> str:
    head, sep, tail = url.rpartition("@")
    if not sep or "://" not in head:
        return url
    scheme, _, auth = head.partition("://")
    return f"{scheme}://{auth.split(':')[0]}:***@{tail}" if ":" in auth else url


def _convert(name: str, raw: Any, kind: Any) -> Any:
    choices = get_args(kind)
    if choices:
        if raw not in choices:
            raise ConfigError(f"MF_{name.upper()} must be one of {', '.join(choices)}, got {raw!r}.")
        return raw
    if kind is bool:
        if isinstance(raw, bool):
            return raw
        if isinstance(raw, str) and raw.strip().lower() in BOOLEANS:
            return BOOLEANS[raw.strip().lower()]
        raise ConfigError(f"MF_{name.upper()} must be true or false, got {raw!r}.")
    if kind is int:
        if isinstance(raw, bool):
            raise ConfigError(f"MF_{name.upper()} must be an integer, got {raw!r}.")
        try:
            return int(raw)
        except (TypeError, ValueError):
            raise ConfigError(f"MF_{name.upper()} must be an integer, got {raw!r}.") from None
    if not isinstance(raw, str):
        raise ConfigError(f"MF_{name.upper()} must be a string, got {raw!r}.")
    return raw


def _tables(path: str, name: str, raw: Any) -> tuple[dict[str, Any], ...]:
    if not isinstance(raw, list):
        raise ConfigError(f"{path}: `{name}` must be an array of tables ([[{name}]]).")
    return tuple(raw)  # each element is checked by its catalog (a meter or a plan must be a table)


def defined_once(source: str, name: str, codes: list[str]) -> None:
    """Raises ConfigError when the last code of `[[name]]` so far was defined before it."""
    if codes[-1] in codes[:-1]:
        raise ConfigError(f"{source}: {name}[{len(codes) - 1}].code: {codes[-1]!r} is defined twice.")


def load(
    env: Mapping[str, str] | None = None,
    config_file: str | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> Settings:
    """Builds the settings: defaults < TOML file (`MF_CONFIG`) < env < overrides."""
    env = os.environ if env is None else env
    hints = get_type_hints(Settings)
    known = {f.name for f in fields(Settings)}
    values: dict[str, Any] = {}
    path = config_file or env.get("MF_CONFIG")
    if path:
        try:
            doc = tomllib.loads(Path(path).read_text())
        except FileNotFoundError:
            raise ConfigError(f"MF_CONFIG points at {path}, which does not exist.") from None
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"{path} is not valid TOML: {e}.") from None
        section = doc.get("meterflow", doc)
        values["config"] = path
        for name in ("meters", "plans"):
            if name in doc:
                values[name] = _tables(path, name, doc[name])
        for key, raw in section.items():
            if key in ("meters", "plans") or isinstance(raw, dict):
                continue
            if key not in known or key == "config":
                raise ConfigError(f"{path}: unknown setting {key!r}.")
            values[key] = _convert(key, raw, hints[key])
    for key, raw in env.items():
        if not key.startswith("MF_") or key == "MF_CONFIG":
            continue
        name = key[3:].lower()
        if name not in known:
            raise ConfigError(f"{key} is not a MeterFlow setting.")
        values[name] = _convert(name, raw, hints[name])
    for name, raw in (overrides or {}).items():
        if raw is not None:
            values[name] = _convert(name, raw, hints[name])
    return Settings(**values)



def data_dir(settings: Settings) -> Path:
    """The data directory, created private: it holds the admin key, raw events and the database."""
    return private_dir(Path(settings.data_dir))


def private_dir(path: Path) -> Path:
    """`path`, created 0700 if it is missing (never wider, whatever the umask); an existing one is kept as is."""
    try:
        path.mkdir(mode=0o700, parents=True)
    except FileExistsError:
        return path
    path.chmod(0o700)
    return path
