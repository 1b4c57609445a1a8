"""What browsers are told (web/browser.py): redirects that never read the Host header, MF_PUBLIC_URL,
MF_COOKIE_SECURE and HSTS, against real servers."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from meterflow.config import ConfigError, load
from tests.harness.meterflow import MeterFlowServer

PUBLIC = "https://billing.example.test"
SPOOFED = {"Host": "evil.example"}


def embedded(work: Path, **env: str) -> MeterFlowServer:
    return MeterFlowServer(work, {"MF_STORAGE": "chdb", "MF_DEDUP": "memory", "MF_DATA_DIR": str(work / "data"),
                                  "MF_ARCHIVE": "none", **env})  # fmt: skip


@pytest.fixture(scope="module")
def plain(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MeterFlowServer]:
    server = embedded(tmp_path_factory.mktemp("plain"))
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def public(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MeterFlowServer]:
    server = embedded(tmp_path_factory.mktemp("public"), MF_PUBLIC_URL=PUBLIC, MF_COOKIE_SECURE="true")
    server.start()
    yield server
    server.stop()


def sign_in(c: httpx.Client) -> httpx.Response:
    form = c.get("/dashboard/signin")
    token = form.text.split('name="csrf" value="')[1].split('"')[0]
    key = MeterFlowServer.auth["Authorization"].removeprefix("Bearer ")
    # Sent by hand: a Secure cookie (MF_COOKIE_SECURE) does not travel over this plain-HTTP test connection.
    cookie = {"Cookie": f"mf_signin={form.cookies['mf_signin']}"}
    return c.post("/dashboard/signin", data={"csrf": token, "key": key}, headers={**SPOOFED, **cookie})


def test_trailing_slash_redirects_are_relative_whatever_the_host_header(plain: MeterFlowServer) -> None:
    with httpx.Client(base_url=plain.url, timeout=30) as c:
        for path, to in (("/dashboard", "/dashboard/"), ("/v1/customers/?limit=2", "/v1/customers?limit=2"),
                         ("/dashboard/customers/", "/dashboard/customers")):  # fmt: skip
            r = c.get(path, headers=SPOOFED)
            assert r.status_code == 307 and r.headers["location"] == to, (path, r.headers.get("location"))
        assert c.get("//evil.example/", headers=SPOOFED).status_code == 404  # never a protocol-relative Location
        signed = sign_in(c)
        assert signed.status_code == 303 and signed.headers["location"] == "/dashboard/"


def test_redirects_are_built_from_the_public_url(public: MeterFlowServer) -> None:
    with httpx.Client(base_url=public.url, timeout=30) as c:
        r = c.get("/dashboard", headers=SPOOFED)
        assert r.status_code == 307 and r.headers["location"] == f"{PUBLIC}/dashboard/"
        assert c.get("/v1/customers/", headers=SPOOFED).headers["location"] == f"{PUBLIC}/v1/customers"
        assert c.get("/dashboard/meters", headers=SPOOFED).headers["location"] == f"{PUBLIC}/dashboard/signin"
        assert sign_in(c).headers["location"] == f"{PUBLIC}/dashboard/"


def test_cookie_secure_forces_the_secure_flag_and_hsts(public: MeterFlowServer, plain: MeterFlowServer) -> None:
    with httpx.Client(base_url=public.url, timeout=30) as c:
        r = sign_in(c)  # over plain HTTP, no X-Forwarded-Proto: Secure all the same
        cookie = next(v for k, v in r.headers.multi_items() if k == "set-cookie" and v.startswith("mf_session="))
        assert "secure" in {a.strip().lower() for a in cookie.split(";")}
        for path in ("/dashboard/signin", "/health", "/v1/customers"):
            assert c.get(path).headers["strict-transport-security"] == "max-age=31536000", path
    with httpx.Client(base_url=plain.url, timeout=30) as c:
        r = sign_in(c)
        cookie = next(v for k, v in r.headers.multi_items() if k == "set-cookie" and v.startswith("mf_session="))
        assert "secure" not in {a.strip().lower() for a in cookie.split(";")}
        assert "strict-transport-security" not in c.get("/dashboard/signin").headers


def test_html_answers_carry_a_csp(plain: MeterFlowServer) -> None:
    with httpx.Client(base_url=plain.url, timeout=30) as c:
        page = c.get("/dashboard/signin")
        assert page.headers["content-type"].startswith("text/html")
        assert "default-src 'self'" in page.headers["content-security-policy"]


@pytest.mark.parametrize(
    ("env", "message"),
    [({"MF_PUBLIC_URL": "billing.example.com"}, "MF_PUBLIC_URL must be an origin"),
     ({"MF_PUBLIC_URL": "https://billing.example.com/app"}, "MF_PUBLIC_URL must be an origin"),
     ({"MF_PUBLIC_URL": "https://u:p@billing.example.com"}, "MF_PUBLIC_URL must be an origin"),
     ({"MF_COOKIE_SECURE": "maybe"}, "MF_COOKIE_SECURE must be true or false"),
     ({"MF_DASHBOARD_SESSION_S": "0"}, "MF_DASHBOARD_SESSION_S must be a positive integer")],
)  # fmt: skip
def test_the_browser_settings_are_checked(env: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load(env=env)
    assert load(env={"MF_PUBLIC_URL": "https://billing.example.com/", "MF_COOKIE_SECURE": "yes"}).cookie_secure
