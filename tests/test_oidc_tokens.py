"""The core's checks of what the OpenID provider sends, through its real path (proxy,
core, provider over HTTP), with a provider that misbehaves on purpose: every bad ID token
ends the login without a PSK; a provider without PKCE S256 is refused; a slow provider
answers 503 and leaves the login to expire normally."""
from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
import pytest_asyncio

from schemas import rpc
from tests.support.oidc import Browser, configure
from tests.support.stack import SecuredNats, Stack
from tests.support.token_issuer import TokenIssuer

pytestmark = pytest.mark.asyncio(loop_scope="module")

OIDC_TIMEOUT_S = 1
PENDING = (428, "OIDC authentication not completed yet")
GONE = (400, "login session not found")


class World:
    def __init__(self, stack: Stack, issuer: TokenIssuer) -> None:
        self.stack = stack
        self.issuer = issuer
        self.n = 0

    async def login(self) -> tuple[str, Browser, str]:
        """A new user (bound on the first good login) and device; (token, browser, user)."""
        self.n += 1
        username = f"u{self.n}"
        await self.stack.admin.call("user_add", rpc.UserAddRequest(username=username, email=f"{username}@example.com"),
                                    rpc.UserInfo)
        _, device = await self.stack.add_device(username, "laptop", "corp")
        self.issuer.subject, self.issuer.email = f"sub-{username}", f"{username}@example.com"
        response = await self.stack.http.post("/api/v1/client-mfa/start", json={
            "location_id": device.location_id, "pubkey": device.pubkey, "method": 2})
        assert response.status_code == 200, response.text
        return response.json()["token"], Browser(self.stack.proxy_url), username

    async def callback(self, token: str, browser: Browser) -> tuple[int, str]:
        info = await browser.auth_info(token)
        assert info.status_code == 200, info.text
        response = await browser.callback(await browser.log_in(info.json()["url"], "unused"))
        await browser.close()
        return response.status_code, response.json().get("error", "")

    async def finish(self, token: str) -> tuple[int, str]:
        response = await self.stack.http.post("/api/v1/client-mfa/finish", json={"token": token})
        return response.status_code, response.json().get("preshared_key") or response.json().get("error")


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def world(nats_for_module: SecuredNats, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[World]:
    stack = Stack(nats_for_module.url, tmp_path_factory.mktemp("oidc-tokens"), rate_limit_per_s="0",
                  oidc_timeout_s=str(OIDC_TIMEOUT_S))
    issuer = TokenIssuer().start()
    await stack.start()
    await configure(stack.admin, issuer.issuer, f"{stack.proxy_url}/openid/mfa/callback")
    await stack.add_location("corp", mfa="external", network="10.90.0.0/24")
    try:
        yield World(stack, issuer)
    finally:
        await stack.stop()
        issuer.stop()


async def test_a_provider_must_offer_pkce_s256_and_asymmetric_id_tokens(world: World) -> None:
    redirect = f"{world.stack.proxy_url}/openid/mfa/callback"
    world.issuer.offers_s256 = False
    with pytest.raises(rpc.RpcFailure, match="does not offer PKCE with S256"):
        await configure(world.stack.admin, world.issuer.issuer, redirect)
    world.issuer.offers_s256, world.issuer.algorithms = True, ["HS256", "none"]
    with pytest.raises(rpc.RpcFailure, match="signs ID tokens with none of"):
        await configure(world.stack.admin, world.issuer.issuer, redirect)
    world.issuer.algorithms = ["RS256", "HS256"]
    try:
        info = await configure(world.stack.admin, world.issuer.issuer, redirect)
        assert info.signing_algs == ["RS256"]  # HS256 is never accepted, even when the provider offers it
    finally:
        world.issuer.algorithms = ["RS256"]


async def test_a_good_id_token_completes_the_login(world: World) -> None:
    world.issuer.mode = "good"
    token, browser, _ = await world.login()
    assert await world.callback(token, browser) == (200, "")
    assert (await world.finish(token))[0] == 200


@pytest.mark.parametrize(("mode", "reason"), [
    ("other_audience", "aud"),
    ("wrong_issuer", "iss"),
    ("expired", "expired"),
    ("issued_in_future", "issued in the future"),
    ("alg_none", "unsupported_algorithm"),
    ("unknown_key", "invalid_key_id"),
    ("hs256", "unsupported_algorithm"),
    ("no_nonce", "nonce"),
])
async def test_a_bad_id_token_ends_the_login_without_a_psk(world: World, mode: str, reason: str) -> None:
    world.issuer.mode = mode
    token, browser, username = await world.login()
    status, error = await world.callback(token, browser)
    assert status == 401 and error.startswith("the ID token is not valid") and reason in error, error
    assert await world.finish(token) == GONE
    users = (await world.stack.admin.call("user_list", rpc.Empty(), rpc.UserListResult)).users
    assert next(u for u in users if u.username == username).oidc_subject is None


async def test_rotated_keys_are_fetched_once(world: World) -> None:
    world.issuer.mode = "rotated_key"
    fetched = world.issuer.jwks_fetches
    token, browser, _ = await world.login()
    assert await world.callback(token, browser) == (200, "")
    assert (await world.finish(token))[0] == 200
    assert world.issuer.jwks_fetches == fetched + 1
    world.issuer.mode = "good"  # signed with the new key, which the core now holds
    world.issuer.key = world.issuer.published[0]
    token, browser, _ = await world.login()
    assert await world.callback(token, browser) == (200, "")
    assert world.issuer.jwks_fetches == fetched + 1


async def test_a_slow_provider_answers_503_and_the_login_expires_normally(world: World) -> None:
    world.issuer.mode = "good"
    world.issuer.token_delay_s = OIDC_TIMEOUT_S + 2
    try:
        token, browser, _ = await world.login()
        status, error = await world.callback(token, browser)
        # the core's own answer (a late one would reach the app as `core unavailable`)
        assert status == 503 and error.startswith("the identity provider is unavailable"), error
        assert await world.finish(token) == PENDING  # not failed: the user may try again
    finally:
        world.issuer.token_delay_s = 0
    # a second try from the page (a new state) succeeds
    browser = Browser(world.stack.proxy_url)
    assert await world.callback(token, browser) == (200, "")
    assert (await world.finish(token))[0] == 200


async def test_a_provider_outage_answers_503_and_keeps_the_login(world: World) -> None:
    world.issuer.mode = "outage"  # its token endpoint answers 502 with an HTML page
    token, browser, _ = await world.login()
    status, error = await world.callback(token, browser)
    assert (status, error) == (503, "the identity provider is unavailable: the provider's token endpoint answered HTTP 502")
    assert await world.finish(token) == PENDING
    world.issuer.mode = "good"
    assert await world.callback(token, Browser(world.stack.proxy_url)) == (200, "")
    assert (await world.finish(token))[0] == 200
