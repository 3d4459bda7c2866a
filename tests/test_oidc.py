"""External MFA (method 2) against a real OpenID provider (panva's oidc-provider), through
running proxy, core and nats-server: the browser flow over HTTP, every way it must fail,
and the happy path in a real headless Chromium."""
from __future__ import annotations

import base64
import hashlib
import json
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_asyncio

from schemas import rpc
from tests.support.oidc import OTHER_CLIENT_ID, Account, Browser, Provider, configure, with_query
from events.bus import BusUnavailable
from tests.support.stack import (
    REPO, BusCapture, SecuredNats, ServiceProcess, Stack, assert_no_secret, eventually, read_stream,
)

pytestmark = pytest.mark.asyncio(loop_scope="module")

PENDING = (428, "OIDC authentication not completed yet")
GONE = (400, "login session not found")
ACCOUNTS = {
    "alice": Account("alice@example.com"),
    "bob": Account("bob@example.com"),
    "carol": Account("carol@example.com", email_verified=False),
    "dora": Account("dora@example.com"),
    "eve": Account("eve@example.com"),
    "fred": Account("fred@example.com"),
    "gina": Account("gina@example.com"),
    "hal": Account("hal@example.com"),
    "ivy": Account("ivy@example.com"),
    "jon": Account("jon@example.com"),
    "kim": Account("kim@example.com"),
    "lea": Account("lea@example.com"),
    "chromy": Account("chromy@example.com"),
    "max": Account("max@example.com"),
}


class World:
    def __init__(self, stack: Stack, provider: Provider) -> None:
        self.stack = stack
        self.provider = provider
        self.location: rpc.LocationAddResult | None = None
        self.browsers: list[Browser] = []

    def browser(self) -> Browser:
        browser = Browser(self.stack.proxy_url)
        self.browsers.append(browser)
        return browser

    async def device(self, username: str, device: str = "laptop") -> rpc.DeviceConfig:
        """A user (email <username>@example.com) with a device at the external location."""
        users = (await self.stack.admin.call("user_list", rpc.Empty(), rpc.UserListResult)).users
        if username not in {u.username for u in users}:
            await self.stack.admin.call("user_add", rpc.UserAddRequest(username=username, email=f"{username}@example.com"),
                                        rpc.UserInfo)
        return (await self.stack.add_device(username, device, "corp"))[1]

    async def start(self, device: rpc.DeviceConfig) -> str:
        response = await self.stack.http.post("/api/v1/client-mfa/start", json={
            "location_id": device.location_id, "pubkey": device.pubkey, "method": 2})
        assert response.status_code == 200, response.text
        assert response.json()["challenge"] is None
        return response.json()["token"]

    async def finish(self, token: str) -> tuple[int, str]:
        response = await self.stack.http.post("/api/v1/client-mfa/finish", json={"token": token})
        body = response.json()
        return response.status_code, body.get("preshared_key") or body.get("error")

    async def authorize_url(self, browser: Browser, token: str) -> str:
        response = await browser.auth_info(token)
        assert response.status_code == 200, response.text
        return response.json()["url"]

    async def user(self, username: str) -> rpc.UserInfo:
        users = (await self.stack.admin.call("user_list", rpc.Empty(), rpc.UserListResult)).users
        return next(u for u in users if u.username == username)


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def world(nats_for_module: SecuredNats, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[World]:
    work = tmp_path_factory.mktemp("oidc")
    stack = Stack(nats_for_module.url, work, rate_limit_per_s="0")
    provider = Provider(f"{stack.proxy_url}/openid/mfa/callback", work / "provider.log", ACCOUNTS).start()
    await stack.start()
    w = World(stack, provider)
    await configure(stack.admin, provider.issuer, provider.redirect_uri)
    w.location = await stack.add_location("corp", mfa="external", network="10.80.0.0/24")
    try:
        yield w
    finally:
        for browser in w.browsers:
            await browser.close()
        await stack.stop()
        provider.stop()


async def test_a_provider_is_read_from_its_discovery_document_or_refused(world: World) -> None:
    stack = world.stack
    with pytest.raises(rpc.RpcFailure, match="cannot reach the provider's discovery document"):
        await configure(stack.admin, "http://127.0.0.1:9", world.provider.redirect_uri)
    with pytest.raises(rpc.RpcFailure, match="must be an https URL"):
        await configure(stack.admin, "http://idp.example.com", world.provider.redirect_uri)
    with pytest.raises(rpc.RpcFailure, match="names issuer"):
        await configure(stack.admin, world.provider.issuer + "/", world.provider.redirect_uri)
    info = await stack.admin.call("oidc_show", rpc.Empty(), rpc.OidcProviderInfo)  # the refusals changed nothing
    assert info.issuer == world.provider.issuer and info.iss_parameter_supported
    assert info.signing_algs == ["RS256"] and info.token_endpoint == f"{world.provider.issuer}/token"
    changes = [e for e in await stack.read("wgmfa.events.admin.>") if e["type"] == "admin.oidc_provider_set"]
    assert changes and changes[-1]["issuer"] == world.provider.issuer and changes[-1]["actor"]
    assert "wgmfa-test-client-secret" not in json.dumps(changes)


async def test_the_browser_login_completes_the_apps_polling_once(world: World) -> None:
    capture = await BusCapture().start(world.stack.nats_url)
    device = await world.device("alice")
    token = await world.start(device)
    assert await world.finish(token) == PENDING

    browser = world.browser()
    info = await browser.auth_info(token)
    assert info.status_code == 200, info.text
    assert info.json()["button_display_name"] == "Test IdP"
    url = info.json()["url"]
    assert url.startswith(f"{world.provider.issuer}/auth?")
    assert "code_challenge_method=S256" in url and "nonce=" in url and "state=" in url
    cookie = info.headers["set-cookie"]
    assert "HttpOnly" in cookie and "SameSite=strict" in cookie and "Path=/api/v1/openid/callback" in cookie
    cookie_value = cookie.split(";")[0].split("=", 1)[1]

    answer = await browser.log_in(url, "alice")
    assert set(answer) == {"code", "state", "iss"}
    assert await world.finish(token) == PENDING  # the provider said yes, the proxy has not been told yet
    done = await browser.callback(answer)
    assert done.status_code == 200, done.text
    assert "wgmfa_oidc=" in done.headers["set-cookie"] and "Max-Age=0" in done.headers["set-cookie"]

    status, psk = await world.finish(token)
    assert status == 200 and len(base64.b64decode(psk)) == 32
    assert await world.finish(token) == GONE
    # the first login bound the provider's identity to the user
    alice = await world.user("alice")
    assert (alice.oidc_issuer, alice.oidc_subject) == (world.provider.issuer, "alice")
    sessions = (await world.stack.admin.call("sessions", rpc.SessionsRequest(location="corp"), rpc.SessionsResult)).sessions
    assert [(s.username, s.method) for s in sessions if s.username == "alice"] == [("alice", "oidc")]

    await capture.stop()
    secrets = {"token": token, "PSK": psk, "code": answer["code"], "state": answer["state"], "cookie": cookie_value,
               "client secret": "wgmfa-test-client-secret"}
    assert_no_secret(capture.text(), secrets, "NATS")
    assert_no_secret(world.stack.logs(), secrets, "the logs")


async def test_a_replayed_callback_is_refused(world: World) -> None:
    device = await world.device("bob")
    token = await world.start(device)
    browser = world.browser()
    answer = await browser.log_in(await world.authorize_url(browser, token), "bob")
    assert (await browser.callback(answer)).status_code == 200
    status, psk = await world.finish(token)
    assert status == 200
    # the same browser (its cookie is gone) and a browser that kept the cookie both fail
    replay = await browser.callback(answer)
    assert replay.status_code == 401 and "cookie" in replay.json()["error"]
    second = world.browser()
    second_token = await world.start(await world.device("bob", "desktop"))
    url = await world.authorize_url(second, second_token)
    keeper = world.browser()  # a copy of the cookie, kept for later
    keeper.http.cookies.set("wgmfa_oidc", second.http.cookies.get("wgmfa_oidc"), domain="127.0.0.1",
                            path="/api/v1/openid/callback")
    answer2 = await second.log_in(url, "bob")
    assert (await second.callback(answer2)).status_code == 200
    again = await keeper.callback(answer2)
    assert (again.status_code, again.json()["error"]) == (400, "OIDC state not found or already used")
    assert (await world.finish(second_token))[0] == 200
    assert await world.finish(second_token) == GONE and await world.finish(token) == GONE


async def test_a_state_from_another_browser_is_refused(world: World) -> None:
    device = await world.device("dora")
    token = await world.start(device)
    owner, stranger = world.browser(), world.browser()
    answer = await owner.log_in(await world.authorize_url(owner, token), "dora")
    without_cookie = await stranger.callback(answer)
    assert without_cookie.status_code == 401, without_cookie.text
    assert without_cookie.json()["error"] == "OIDC cookie not found: finish the login in the browser that started it"
    # the stranger with a cookie of a login of its own
    own_token = await world.start(await world.device("dora", "phone"))
    await stranger.auth_info(own_token)
    with_other_cookie = await stranger.callback(answer)
    assert with_other_cookie.status_code == 401
    assert with_other_cookie.json()["error"] == "OIDC state does not belong to this browser"
    # a forged cookie
    forger = world.browser()
    forger.http.cookies.set("wgmfa_oidc", "A" * 80, domain="127.0.0.1", path="/api/v1/openid/callback")
    assert (await forger.callback(answer)).status_code == 401
    assert await world.finish(token) == PENDING  # no PSK, and the login is still the owner's
    assert (await owner.callback(answer)).status_code == 200
    assert (await world.finish(token))[0] == 200


async def test_the_state_of_another_login_is_refused(world: World) -> None:
    first = await world.start(await world.device("eve"))
    second = await world.start(await world.device("eve", "desktop"))
    attacker, victim = world.browser(), world.browser()
    await attacker.auth_info(first)  # the attacker's browser is bound to the first login
    victim_answer = await victim.log_in(await world.authorize_url(victim, second), "eve")
    refused = await attacker.callback(victim_answer)
    assert refused.status_code == 401 and refused.json()["error"] == "OIDC state does not belong to this browser"
    assert await world.finish(first) == PENDING and await world.finish(second) == PENDING


async def test_an_id_token_with_another_nonce_is_refused(world: World) -> None:
    token = await world.start(await world.device("fred"))
    browser = world.browser()
    url = with_query(await world.authorize_url(browser, token), nonce="a-nonce-this-login-never-made")
    refused = await browser.callback(await browser.log_in(url, "fred"))
    assert refused.status_code == 401 and "nonce" in refused.json()["error"]
    assert await world.finish(token) == GONE
    assert (await world.user("fred")).oidc_subject is None


async def test_a_pkce_verifier_that_does_not_match_is_refused(world: World) -> None:
    token = await world.start(await world.device("gina"))
    browser = world.browser()
    other_challenge = base64.urlsafe_b64encode(hashlib.sha256(b"another verifier " * 4).digest()).decode().rstrip("=")
    url = with_query(await world.authorize_url(browser, token), code_challenge=other_challenge)
    refused = await browser.callback(await browser.log_in(url, "gina"))
    assert refused.status_code == 401 and refused.json()["error"] == "the provider refused the code: invalid_grant"
    assert await world.finish(token) == GONE


async def test_a_code_issued_to_another_client_is_refused(world: World) -> None:
    token = await world.start(await world.device("hal"))
    browser = world.browser()
    url = with_query(await world.authorize_url(browser, token), client_id=OTHER_CLIENT_ID)
    refused = await browser.callback(await browser.log_in(url, "hal"))
    assert refused.status_code == 401 and "invalid_grant" in refused.json()["error"]
    assert await world.finish(token) == GONE


async def test_an_answer_naming_another_issuer_is_refused(world: World) -> None:
    token = await world.start(await world.device("ivy"))
    browser = world.browser()
    answer = await browser.log_in(await world.authorize_url(browser, token), "ivy")
    refused = await browser.callback({**answer, "iss": "https://idp.attacker.example"})
    assert refused.status_code == 401 and "configured provider" in refused.json()["error"]
    assert await world.finish(token) == GONE
    # the provider advertises RFC 9207, so an answer without iss is refused too
    token = await world.start(await world.device("ivy", "desktop"))
    answer = await browser.log_in(await world.authorize_url(browser, token), "ivy")
    refused = await browser.callback({k: v for k, v in answer.items() if k != "iss"})
    assert refused.status_code == 401
    assert await world.finish(token) == GONE


async def test_a_provider_refusal_ends_the_login(world: World) -> None:
    token = await world.start(await world.device("jon"))
    browser = world.browser()
    url = await world.authorize_url(browser, token)
    state = dict(p.split("=", 1) for p in url.split("?", 1)[1].split("&"))["state"]
    refused = await browser.callback({"state": state, "error": "access_denied", "iss": world.provider.issuer})
    assert refused.status_code == 401 and "access_denied" in refused.json()["error"]
    assert await world.finish(token) == GONE


async def test_only_the_users_own_identity_completes_the_login(world: World) -> None:
    # kim's first login binds kim@provider
    token = await world.start(await world.device("kim"))
    browser = world.browser()
    assert (await browser.callback(await browser.log_in(await world.authorize_url(browser, token), "kim"))).status_code == 200
    assert (await world.finish(token))[0] == 200
    # a valid login of another user at the provider (lea) cannot complete kim's login
    token = await world.start(await world.device("kim", "desktop"))
    other = world.browser()
    refused = await other.callback(await other.log_in(await world.authorize_url(other, token), "lea"))
    assert refused.status_code == 401
    assert refused.json()["error"] == "this identity cannot complete the login of this device's user"
    assert await world.finish(token) == GONE
    assert (await world.user("kim")).oidc_subject == "kim"
    # nor can it bind to an unbound user whose email is not its own
    token = await world.start(await world.device("dummy"))
    third = world.browser()
    assert (await third.callback(await third.log_in(await world.authorize_url(third, token), "lea"))).status_code == 401
    assert await world.finish(token) == GONE

    # after `oidc unlink` the next login binds again, by verified email
    unlinked = await world.stack.admin.call("oidc_unlink", rpc.UserChangeRequest(username="kim", actor="helpdesk"),
                                            rpc.UserInfo)
    assert unlinked.oidc_issuer is None and unlinked.oidc_subject is None
    audit = [e for e in await world.stack.read("wgmfa.events.admin.>") if e["type"] == "admin.oidc_unlinked"]
    assert [(e["username"], e["actor"]) for e in audit] == [("kim", "helpdesk")]
    assert audit[0]["changes"]["oidc_identity"]["old"] == f"kim at {world.provider.issuer}"
    token = await world.start(await world.device("kim", "tablet"))
    fourth = world.browser()
    assert (await fourth.callback(await fourth.log_in(await world.authorize_url(fourth, token), "kim"))).status_code == 200
    assert (await world.finish(token))[0] == 200
    assert (await world.user("kim")).oidc_subject == "kim"


async def test_an_unverified_email_does_not_bind_on_the_first_login(world: World) -> None:
    token = await world.start(await world.device("carol"))
    browser = world.browser()
    refused = await browser.callback(await browser.log_in(await world.authorize_url(browser, token), "carol"))
    assert refused.status_code == 401
    assert await world.finish(token) == GONE
    assert (await world.user("carol")).oidc_subject is None
    failures = [e for e in await read_stream_events(world) if e.get("type") == "mfa.failed" and e.get("username") == "carol"]
    assert [e["reason"] for e in failures] == ["oidc_email_unverified"]


async def read_stream_events(world: World) -> list[dict]:
    from events.bus import Bus

    bus = await Bus.connect(world.stack.nats_url, "test-read", wait_s=5)
    try:
        return await read_stream(bus, "wgmfa.events.>")
    finally:
        await bus.close()


async def test_the_pages_and_the_calls_refuse_what_is_not_theirs(world: World) -> None:
    http = world.stack.http
    page = await http.get("/openid/mfa?token=x")
    assert page.status_code == 200 and "text/html" in page.headers["content-type"]
    assert "frame-ancestors 'none'" in page.headers["content-security-policy"]
    assert (await http.get("/openid/mfa/callback?code=x&state=y")).status_code == 200
    assert (await http.post("/api/v1/openid/auth_info", json={"state": "x", "type": "enrollment"})).status_code == 400
    unknown = await http.post("/api/v1/openid/auth_info", json={"state": "no-such-token", "type": "mfa"})
    assert (unknown.status_code, unknown.json()["error"]) == GONE
    wrong_type = await http.post("/api/v1/openid/callback/mfa", json={"state": "x", "code": "y", "type": "enrollment"})
    assert (wrong_type.status_code, wrong_type.json()["error"]) == (400, "Invalid flow type for MFA callback")
    # a TOTP login is not an OIDC login
    internal = await world.stack.add_location("inside", network="10.81.0.0/24")
    secret = await world.stack.add_user_with_totp("lou")
    assert secret
    _, device = await world.stack.add_device("lou", "laptop", internal.location.name)
    totp_token = (await http.post("/api/v1/client-mfa/start", json={
        "location_id": device.location_id, "pubkey": device.pubkey, "method": 0})).json()["token"]
    wrong = await http.post("/api/v1/openid/auth_info", json={"state": totp_token, "type": "mfa"})
    assert (wrong.status_code, wrong.json()["error"]) == (400, "invalid MFA method")
    # and an external location takes nothing but OIDC
    device = await world.device("lou", "desktop")
    other = await http.post("/api/v1/client-mfa/start", json={"location_id": device.location_id, "pubkey": device.pubkey,
                                                                "method": 0})
    assert (other.status_code, other.json()["error"]) == (400, "selected MFA method not supported by location")


async def test_oidc_admin_commands(world: World, tmp_path: Path) -> None:
    env = world.stack.env

    def wgmfa(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "wgmfa", "admin", *args], env=env, cwd=REPO,
                              capture_output=True, text=True, timeout=60)

    shown = wgmfa("oidc", "show")
    assert shown.returncode == 0, shown.stderr
    assert f"issuer: {world.provider.issuer}" in shown.stdout and "secret" not in shown.stdout.lower()
    secret_file = tmp_path / "secret"
    secret_file.write_text("wgmfa-test-client-secret-0123456789\n")
    public = {**env, "WGMFA_PUBLIC_URL": world.stack.proxy_url}
    done = subprocess.run([sys.executable, "-m", "wgmfa", "admin", "oidc", "set", "--issuer", world.provider.issuer,
                           "--client-id", "wgmfa", "--client-secret-file", str(secret_file), "--display-name", "Test IdP"],
                          env=public, cwd=REPO, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert f"{world.stack.proxy_url}/openid/mfa/callback" in done.stdout
    as_json = json.loads(wgmfa("oidc", "show", "--json").stdout)
    assert as_json["redirect_uri"] == f"{world.stack.proxy_url}/openid/mfa/callback"
    unknown = wgmfa("oidc", "unlink", "nobody")
    assert unknown.returncode == 1 and "nobody" in unknown.stderr


async def test_any_proxy_and_any_core_take_any_step(world: World) -> None:
    stack = world.stack
    _, other_proxy = await stack.extra_proxy()
    token = await world.start(await world.device("max"))
    browser = world.browser()
    answer = await browser.log_in(await world.authorize_url(browser, token), "max")
    # the core that made the state and the cookie goes away; another one takes over
    other_core = ServiceProcess("core_service", stack.env, stack.work_dir / "core-2.log")
    other_core.start()
    stack.core.stop()
    try:
        await eventually(lambda: _core_answers(stack), timeout=30, interval=0.2, what="the other core")
        done = await browser.http.post(f"{other_proxy}/api/v1/openid/callback/mfa", json={"type": "mfa", **answer})
        assert done.status_code == 200, done.text
        finished = await browser.http.post(f"{other_proxy}/api/v1/client-mfa/finish", json={"token": token})
        assert finished.status_code == 200, finished.text
    finally:
        other_core.stop()
        stack.core.start()
        await stack.wait_core()


async def _core_answers(stack: Stack) -> bool:
    try:
        await stack.admin.call("oidc_show", rpc.Empty(), rpc.OidcProviderInfo)
        return True
    except BusUnavailable:
        return False


@pytest.mark.timeout(180)
async def test_the_happy_path_in_a_real_browser(world: World) -> None:
    from tests.support.browser import log_in_with_chromium

    token = await world.start(await world.device("chromy"))
    page = await log_in_with_chromium(f"{world.stack.proxy_url}/openid/mfa?token={token}", "chromy", world.stack.work_dir)
    assert "VPN login succeeded" in page and "You can close this window" in page
    status, psk = await world.finish(token)
    assert status == 200 and len(base64.b64decode(psk)) == 32


@pytest.mark.timeout(120)
async def test_the_page_tells_the_user_when_the_login_cannot_go_on(world: World) -> None:
    from tests.support.browser import page_in_chromium

    text, button = await page_in_chromium(f"{world.stack.proxy_url}/openid/mfa?token=expired-or-unknown",
                                          "cannot go on", world.stack.work_dir)
    assert "Login session not found. Start the login again from the VPN app." in text and not button
    text, button = await page_in_chromium(f"{world.stack.proxy_url}/openid/mfa/callback?state=unknown&code=x",
                                          "VPN login failed", world.stack.work_dir)
    assert "Start the login again" in text and not button
