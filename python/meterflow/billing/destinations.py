"""Where webhooks may be sent: the URL rules and the address check, made at registration and before every delivery.

A receiver's URL is https (http only for hosts the operator lists), holds no credentials, has a port from 1
to 65535 and a host that is a name or a canonical IP literal. Every address the host resolves to must be a
public one: loopback, link-local (169.254.169.254, the cloud metadata address, among them), private, shared,
reserved, multicast, unspecified and IPv4-mapped or IPv4-embedding IPv6 addresses are refused unless the
operator's allow-list names the address (a CIDR) or the host. The sender connects to the very addresses
checked here (`CheckedResolver`), so a name that resolves elsewhere a moment later (DNS rebinding) gains
nothing.
"""

from __future__ import annotations

import asyncio
import ipaddress
import re
import socket
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any
from urllib.parse import SplitResult, urlsplit

from aiohttp.abc import AbstractResolver, ResolveResult

from meterflow.config import Settings, allowed_addresses, host_list

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

RESOLVE_TIMEOUT_S = 5.0
_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")
# WHATWG URL parsing (and inet_aton) read a host whose last label is a number as an IPv4 address in any
# base and any number of parts: 2130706433, 0x7f000001, 0177.0.0.1 and 127.1 are all 127.0.0.1.
_NUMERIC_LABEL = re.compile(r"^(0x[0-9a-f]*|[0-9]+)$")


class RefusedDestination(Exception):
    """A URL or an address a webhook may not go to; `rule` is its short class, `message` one sentence."""

    def __init__(self, rule: str, message: str) -> None:
        super().__init__(message)
        self.rule = rule
        self.message = message


class UnresolvedHost(Exception):
    """The receiver's host name does not resolve (or not in time)."""


def address_class(ip: IPAddress) -> str | None:
    """The class of a non-public address ("loopback", "private", ...), None for a public one."""
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return "IPv4-mapped IPv6"
        embedded = ip.sixtofour or (ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF) if ip in _NAT64 else None)
        if embedded is not None and address_class(embedded) is not None:
            return "IPv6 embedding a non-public IPv4"
    # Reserved before private: Python counts 240.0.0.0/4 as both.
    for name, hit in (("unspecified", ip.is_unspecified), ("loopback", ip.is_loopback),
                      ("link-local", ip.is_link_local), ("multicast", ip.is_multicast),
                      ("reserved", ip.is_reserved), ("private", ip.is_private)):  # fmt: skip
        if hit:
            return name
    return None if ip.is_global else "not globally routable"


def _literal(host: str) -> IPAddress | None:
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        return None


@dataclass(frozen=True)
class Destinations:
    """The operator's exceptions: hosts that may use http, and addresses (CIDRs) or hosts that may be non-public."""

    http_hosts: frozenset[str] = frozenset()
    networks: tuple[IPNetwork, ...] = ()
    hosts: frozenset[str] = frozenset()

    @classmethod
    def from_settings(cls, settings: Settings) -> Destinations:
        """MF_WEBHOOK_ALLOW_HTTP_HOSTS and MF_WEBHOOK_ALLOW_ADDRESSES (checked when the settings were made)."""
        networks, hosts = allowed_addresses(settings.webhook_allow_addresses)
        return cls(host_list(settings.webhook_allow_http_hosts), networks, hosts)

    def check_url(self, url: str) -> tuple[str, int]:
        """(host, port) of an acceptable URL; RefusedDestination naming the rule otherwise (no I/O)."""
        shown = url[:100]
        try:
            parts = urlsplit(url)
            port = parts.port
        except ValueError:
            raise RefusedDestination("port", f"`url` {shown!r} has an invalid port; a port is from 1 to 65535."
                                     ) from None  # fmt: skip
        host = (parts.hostname or "").rstrip(".")
        if parts.scheme not in ("http", "https") or not host:
            raise RefusedDestination("scheme", f"`url` {shown!r} is not an https:// URL with a host.")
        if parts.scheme == "http" and host not in self.http_hosts:
            raise RefusedDestination("scheme", "`url` must be https://; http:// is allowed only for the hosts "
                                     f"in MF_WEBHOOK_ALLOW_HTTP_HOSTS, and {host[:100]!r} is not one.")  # fmt: skip
        if _has_credentials(parts):
            raise RefusedDestination("credentials", "`url` must not hold credentials (user:password@).")
        if port is not None and not 1 <= port <= 65535:
            raise RefusedDestination("port", f"`url` has port {port}; a port is from 1 to 65535.")
        ip = _literal(host.split("%", 1)[0])
        if ip is None and _NUMERIC_LABEL.match(host.rsplit(".", 1)[-1]):
            raise RefusedDestination("ip_form", f"`url` host {host[:100]!r} is an IP address in a non-canonical "
                                     "form (decimal, octal, hex or shortened); write it dotted-decimal.")  # fmt: skip
        if ip is not None:
            self.check_address(host, ip)
        return host, port if port is not None else (443 if parts.scheme == "https" else 80)

    def check_address(self, host: str, ip: IPAddress) -> None:
        """RefusedDestination when `ip` (an address of `host`) is not public and not allowed."""
        kind = address_class(ip)
        if kind is None or host in self.hosts or any(ip in n for n in self.networks if n.version == ip.version):
            return
        raise RefusedDestination("address", f"`url` host {host[:100]!r} resolves to {ip}, a {kind} address; "
                                 "webhooks go to public addresses only, unless MF_WEBHOOK_ALLOW_ADDRESSES "
                                 "lists the address or the host.")  # fmt: skip

    async def resolve(self, host: str, port: int) -> list[IPAddress]:
        """The host's addresses, every one checked; RefusedDestination if any is refused, UnresolvedHost if none."""
        literal = _literal(host.split("%", 1)[0])
        if literal is not None:
            self.check_address(host, literal)
            return [literal]
        loop = asyncio.get_running_loop()
        try:
            infos = await asyncio.wait_for(
                loop.getaddrinfo(host, port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP), RESOLVE_TIMEOUT_S)
        except (OSError, TimeoutError, UnicodeError):
            raise UnresolvedHost(host) from None
        found = _addresses(info[4][0] for info in infos)
        if not found:
            raise UnresolvedHost(host)
        for ip in found:
            self.check_address(host, ip)
        return found

    async def check(self, url: str) -> None:
        """The registration check: the URL rules and every address its host resolves to now."""
        host, port = self.check_url(url)
        try:
            await self.resolve(host, port)
        except UnresolvedHost:
            raise RefusedDestination("unresolved", f"`url` host {host[:100]!r} does not resolve.") from None


def _has_credentials(parts: SplitResult) -> bool:
    return "@" in parts.netloc or parts.username is not None or parts.password is not None


def _addresses(raw: Iterable[Any]) -> list[IPAddress]:
    seen: dict[IPAddress, None] = {}
    for a in raw:
        ip = _literal(str(a).split("%", 1)[0])
        if ip is not None:
            seen[ip] = None
    return list(seen)


class CheckedResolver(AbstractResolver):
    """aiohttp's resolver for the sender: the addresses it returns are the ones `Destinations` checked, and
    aiohttp connects to exactly those (TLS still verifies the URL's host name, Host stays the URL's host)."""

    def __init__(self, destinations: Destinations) -> None:
        self._destinations = destinations

    async def resolve(self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
                      ) -> list[ResolveResult]:  # fmt: skip
        addrs = await self._destinations.resolve(host.rstrip("."), port)
        return [{"hostname": host, "host": str(ip), "port": port,
                 "family": socket.AF_INET6 if ip.version == 6 else socket.AF_INET,
                 "proto": socket.IPPROTO_TCP, "flags": socket.AI_NUMERICHOST} for ip in addrs]  # fmt: skip

    async def close(self) -> None:
        return None
