"""Where webhooks may go (issue 23, finding 2): https only, no credentials, ports 1-65535, public addresses only
(checked at registration and before every delivery, DNS rebinding included), unless the operator's allow-lists
say otherwise; the delivery log holds error classes, never exception text. The only receivers are loopback
servers the tests start, reached through the explicit allow-list."""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import httpx
import pytest
import sqlalchemy as sa

from meterflow.billing.destinations import Destinations
from meterflow.billing.invoices import Invoices
from meterflow.billing.outbox import Sender
from meterflow.billing.webhooks import Webhooks, new_secret
from meterflow.config import ConfigError, Settings
from meterflow.kernel.clock import now_ms
from meterflow.records import Records
from meterflow.records.tables import webhooks
from tests.billing.test_webhooks import FAST, Receiver, deliveries
from tests.harness.backends import Backend
from tests.harness.invoice_samples import draft
from tests.harness.meterflow import MeterFlowServer
from tests.harness.processes import free_port, until

# The receiver the tests start, and the one allow-list entry that lets webhooks reach it.
ALLOW = Destinations.from_settings(Settings(webhook_allow_http_hosts="127.0.0.1,rebind.test",
                                            webhook_allow_addresses="127.0.0.1/32"))  # fmt: skip
ALLOW_ENV = {"MF_WEBHOOK_ALLOW_HTTP_HOSTS": "127.0.0.1", "MF_WEBHOOK_ALLOW_ADDRESSES": "127.0.0.1/32"}

# Every class of address a receiver may not have, as https URLs (so the scheme rule is not what refuses
# them), with the rule the answer names. The port is a loopback receiver's where it would reach one.
REFUSED_ADDRESSES: list[tuple[str, str]] = [
    ("https://127.0.0.2:{port}/", "loopback"),
    ("https://[::1]:{port}/", "loopback"),
    ("https://169.254.169.254/latest/meta-data/", "link-local"),
    ("https://[fe80::1]/", "link-local"),
    ("https://10.0.0.1/", "private"),
    ("https://172.16.5.4/", "private"),
    ("https://192.168.1.1/", "private"),
    ("https://[fd00::1]/", "private"),
    ("https://100.64.0.1/", "not globally routable"),  # shared address space (carrier-grade NAT)
    ("https://240.0.0.1/", "reserved"),
    ("https://224.0.0.1/", "multicast"),
    ("https://[ff02::1]/", "multicast"),
    ("https://0.0.0.0:{port}/", "unspecified"),  # Linux connects 0.0.0.0 to the loopback
    ("https://[::]:{port}/", "unspecified"),
    ("https://[::ffff:127.0.0.1]:{port}/", "IPv4-mapped IPv6"),
    ("https://[::ffff:169.254.169.254]/", "IPv4-mapped IPv6"),
    ("https://[2002:7f00:1::]/", "IPv6 embedding a non-public IPv4"),  # 6to4 of 127.0.0.1
    ("https://[64:ff9b::a9fe:a9fe]/", "IPv6 embedding a non-public IPv4"),  # NAT64 of 169.254.169.254
]
# The same loopback address written as inet_aton reads it: decimal, hex, octal, shortened.
REFUSED_FORMS = ["https://2130706433:{port}/", "https://0x7f000001:{port}/", "https://0177.0.0.1:{port}/",
                 "https://127.1:{port}/", "https://0x7f.1:{port}/"]  # fmt: skip
REFUSED_URLS: list[tuple[str, str]] = [
    ("http://example.com/hooks", "https://"),  # http for a host not listed
    ("http://127.0.0.2:{port}/", "https://"),
    ("https://user:pass@example.com/hooks", "credentials"),
    ("https://token@example.com/hooks", "credentials"),
    ("https://example.com:99999/hooks", "port"),
    ("https://example.com:0/hooks", "port"),
    ("https://example.com:-1/hooks", "port"),
    ("ftp://example.com/hooks", "https://"),
]


def test_allow_lists_are_checked_at_start() -> None:
    with pytest.raises(ConfigError, match=r"MF_WEBHOOK_ALLOW_ADDRESSES: '10\.0\.0\.0/33'"):
        Settings(webhook_allow_addresses="127.0.0.1/32, 10.0.0.0/33")
    d = Destinations.from_settings(Settings(webhook_allow_http_hosts=" Hooks.Internal. ,127.0.0.1",
                                            webhook_allow_addresses="10.1.0.0/16,::1,hooks.internal"))  # fmt: skip
    assert d.http_hosts == {"hooks.internal", "127.0.0.1"} and d.hosts == {"hooks.internal"}
    assert [str(n) for n in d.networks] == ["10.1.0.0/16", "::1/128"]


def test_registration_refuses_every_non_public_address_class(
    make_backend: Callable[[str], Backend], start_server: Callable[..., MeterFlowServer]
) -> None:
    server = start_server(make_backend("embedded"), **ALLOW_ENV)
    port = free_port()
    with httpx.Client(base_url=server.url, headers=server.auth, timeout=30) as c:
        for template, rule in REFUSED_ADDRESSES:
            url = template.format(port=port)
            r = c.post("/v1/webhooks", json={"url": url})
            assert r.status_code == 400 and r.json()["error"] == "invalid_webhook", (url, r.text)
            message = r.json()["message"]
            assert message.startswith("`url` host") and f"a {rule} address" in message, (url, message)
            assert "MF_WEBHOOK_ALLOW_ADDRESSES" in message
        for template in REFUSED_FORMS:
            r = c.post("/v1/webhooks", json={"url": template.format(port=port)})
            assert r.status_code == 400 and "non-canonical form" in r.json()["message"], (template, r.text)
        for template, rule in REFUSED_URLS:
            r = c.post("/v1/webhooks", json={"url": template.format(port=port)})
            assert r.status_code == 400 and r.json()["message"].startswith("`url`"), (template, r.text)
            assert rule in r.json()["message"], (template, r.json()["message"])
        assert c.get("/v1/webhooks").json()["data"] == []
        # The allow-listed loopback receiver itself is accepted (http for its host, its address listed).
        ok = c.post("/v1/webhooks", json={"url": f"http://127.0.0.1:{port}/hooks"})
        assert ok.status_code == 201, ok.text


@pytest.fixture
def fake_dns(monkeypatch: pytest.MonkeyPatch) -> Iterator[dict[str, list[list[str]]]]:
    """Names under .test resolve to what the test says: each lookup takes the first answer of the name's list
    off it (the last one stays). Every other name resolves as usual."""
    answers: dict[str, list[list[str]]] = {}
    real = socket.getaddrinfo

    def getaddrinfo(host: Any, port: Any, *args: Any, **kwargs: Any) -> list[Any]:
        name = host.decode() if isinstance(host, bytes) else str(host)
        if name.rstrip(".") not in answers:
            return real(host, port, *args, **kwargs)
        seq = answers[name.rstrip(".")]
        out = []
        for ip in seq.pop(0) if len(seq) > 1 else seq[0]:
            fam = socket.AF_INET6 if ":" in ip else socket.AF_INET
            addr = (ip, int(port or 0), 0, 0) if fam == socket.AF_INET6 else (ip, int(port or 0))
            out.append((fam, socket.SOCK_STREAM, socket.IPPROTO_TCP, "", addr))
        return out

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    yield answers


async def _insert_endpoint(records: Records, url: str) -> str:
    """An endpoint written straight to the records, as one registered before these rules or whose name
    resolved elsewhere then: only the delivery-time check stands between it and the address."""
    wid = f"wh_{abs(hash(url)) % 10**24:024d}"
    async with records.begin() as conn:
        await conn.execute(sa.insert(webhooks).values(
            id=wid, url=url, secret=new_secret(), events=["invoice.finalized"], description=None,
            created_at=now_ms(), deleted_at=None))  # fmt: skip
    return wid


@pytest.fixture
async def started_receiver() -> AsyncIterator[Receiver]:
    r = Receiver()
    await r.start()
    yield r
    await r.stop()


async def test_delivery_refuses_every_non_public_address_and_logs_classes_only(
    records: Records, started_receiver: Receiver, fake_dns: dict[str, list[list[str]]]
) -> None:
    receiver = started_receiver
    port = receiver.port
    # A name that resolves to the metadata address, one that mixes a public and a private address.
    fake_dns["metadata.test"] = [["169.254.169.254"]]
    fake_dns["mixed.test"] = [["93.184.215.14", "10.0.0.1"]]
    refused = [t.format(port=port) for t, _ in REFUSED_ADDRESSES] + [t.format(port=port) for t in REFUSED_FORMS]
    refused += [f"https://metadata.test:{port}/", f"https://mixed.test:{port}/"]
    bad_urls = [f"http://127.0.0.2:{port}/", f"https://user:pass@127.0.0.1:{port}/hooks"]
    ids = {await _insert_endpoint(records, u): u for u in [*refused, *bad_urls]}
    good = await Webhooks(records, ALLOW).register(receiver.url, ["invoice.finalized"], None)
    invoices = Invoices(records, None)
    inv = await invoices.transition((await draft(invoices))["id"], "finalize")
    assert inv is not None
    sender = Sender(records, FAST, destinations=ALLOW, concurrency=64)
    sender.start()
    try:
        await until(lambda: len(receiver.accepted) == 1, "the allow-listed receiver gets its delivery")

        async def all_tried() -> bool:
            return all(r["attempts"] >= 1 for r in await deliveries(records) if r["webhook_id"] in ids)

        await until(all_tried, "every refused endpoint attempted")
    finally:
        await sender.stop()
    # Only the allow-listed endpoint reached the receiver (0.0.0.0, [::] and the mapped form would have).
    assert [h["webhook-id"] for h, _ in receiver.received] == [
        d["id"] for d in await deliveries(records) if d["webhook_id"] == good["id"]
    ]
    hooks = Webhooks(records)
    for wid, url in ids.items():
        [log] = await hooks.deliveries(wid, "", 10)
        errors = {a["error"] for a in log["attempts"]}
        want = "refused_url" if url in bad_urls else "refused_address"
        assert errors == {want} and all(a["status_code"] is None for a in log["attempts"]), (url, log)


async def test_dns_rebinding_connects_only_to_the_address_checked(
    records: Records, fake_dns: dict[str, list[list[str]]]
) -> None:
    """A name that answers the allowed address when checked and an internal one the next time: the sender
    connects to the address it checked, and the next lookup's internal answer is refused, never connected."""
    port = free_port()
    public, internal = Receiver(port=port), Receiver(port=port, host="127.0.0.2")
    await public.start()
    await internal.start()
    try:
        fake_dns["rebind.test"] = [["127.0.0.1"]]
        hook = await Webhooks(records, ALLOW).register(f"http://rebind.test:{port}/hooks", ["invoice.finalized"],
                                                       None)  # fmt: skip
        # The next lookup answers the allowed address, every one after it the internal one.
        fake_dns["rebind.test"] = [["127.0.0.1"], ["127.0.0.2"]]
        invoices = Invoices(records, None)
        await invoices.transition((await draft(invoices, "c1", "s1"))["id"], "finalize")
        sender = Sender(records, FAST, destinations=ALLOW)
        sender.start()
        try:
            await until(lambda: len(public.accepted) == 1, "the first delivery reaches the checked address")
            await invoices.transition((await draft(invoices, "c2", "s2"))["id"], "finalize")

            async def second_refused() -> bool:
                log = await Webhooks(records).deliveries(hook["id"], "", 10)
                return len(log) == 2 and any(a["error"] == "refused_address" for x in log for a in x["attempts"])

            await until(second_refused, "the rebound answer refused")
        finally:
            await sender.stop()
        assert internal.received == [] and len(public.received) == 1
        assert public.received[0][0]["host"] == f"rebind.test:{port}"  # the URL's host, not the address
    finally:
        await public.stop()
        await internal.stop()
