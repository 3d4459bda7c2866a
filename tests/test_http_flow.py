"""The client MFA flow over HTTP, through a running proxy, core and nats-server, as
Defguard's desktop client drives it."""
from __future__ import annotations

import asyncio
import base64
import json
from collections.abc import AsyncIterator
from pathlib import Path

import pyotp
import pytest
import pytest_asyncio

from events import subjects
from events.peer_log import PeerLog
from schemas import signing
from events.bus import Bus
from schemas.sealing import generate_keypair, unseal
from schemas.events import PeerAuthorized
from schemas.rpc import RpcFailure
from tests.conftest import running_nats
from tests.support.stack import BusCapture, SecuredNats, Stack, assert_no_secret

pytestmark = pytest.mark.asyncio(loop_scope="module")

LOGIN_TTL_S = 4


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def stack(nats_for_module: SecuredNats, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Stack]:
    running = Stack(
        nats_for_module.url,
        tmp_path_factory.mktemp("http-flow"),
        login_ttl_s=str(LOGIN_TTL_S),
        rate_limit_per_s="0",
    )
    await running.start()
    yield running
    await running.stop()


_names = iter(range(1, 10_000))


async def setup_device(stack: Stack, *, mfa: str = "internal", totp: bool = True) -> dict:
    """A fresh location, user (with confirmed TOTP) and device; returns what a client knows."""
    n = next(_names)
    location = await stack.add_location(f"loc{n}", mfa=mfa, network=f"10.{n % 250}.{n // 250}.0/24")
    username = f"user{n}"
    if totp:
        secret = await stack.add_user_with_totp(username)
    else:
        from schemas import rpc

        await stack.admin.call("user_add", rpc.UserAddRequest(username=username, email=f"{username}@example.com"), rpc.UserInfo)
        secret = ""
    private, config = await stack.add_device(username, "laptop", location.location.name)
    return {"location": location, "secret": secret, "pubkey": config.pubkey, "config": config, "username": username}


async def start(stack: Stack, location_id: int, pubkey: str, method: int = 0):
    return await stack.http.post("/api/v1/client-mfa/start", json={"location_id": location_id, "pubkey": pubkey, "method": method})


async def finish(stack: Stack, token: str, code: str | None):
    body = {"token": token} if code is None else {"token": token, "code": code}
    return await stack.http.post("/api/v1/client-mfa/finish", json=body)


async def test_totp_login_gives_a_fresh_psk_and_authorizes_the_peer(stack: Stack) -> None:
    d = await setup_device(stack)
    location_id = d["location"].location.id
    started = await start(stack, location_id, d["pubkey"])
    assert started.status_code == 200, started.text
    assert started.json()["challenge"] is None
    token = started.json()["token"]
    assert len(token) >= 22 and token.isalnum()  # 128+ bits, safe to paste anywhere

    finished = await finish(stack, token, pyotp.TOTP(d["secret"]).now())
    assert finished.status_code == 200, finished.text
    body = finished.json()
    assert body["token"] is None
    psk = body["preshared_key"]
    assert len(psk) == 44 and len(base64.b64decode(psk, validate=True)) == 32

    # The gateways learn it: peer.authorized, sealed to the location's gateway key.
    credentials = json.loads(stack.admin.reply_key.open(d["location"].credentials_sealed))
    bus = await Bus.connect(stack.nats_url, "test", wait_s=5)
    try:
        record = await PeerLog(bus).last_peer_state(location_id, d["config"].device_id)
    finally:
        await bus.close()
    assert isinstance(record.state, PeerAuthorized)
    state = record.state
    assert state.pubkey == d["pubkey"]
    assert state.allowed_ips == [d["config"].address.split("/")[0] + "/32"]
    assert state.generation == 1 and state.threshold_s == 300
    assert unseal(credentials["sealing_private_key"], state.psk_sealed).decode() == psk
    # signed by the core, with the key the gateway credentials carry, over what it applies
    signing.verify(state, credentials["core_signing_key"])
    assert credentials["mfa_required"] is True and credentials["network"] == d["location"].location.network

    # Another user's login gets another key.
    other = await setup_device(stack)
    token2 = (await start(stack, other["location"].location.id, other["pubkey"])).json()["token"]
    psk2 = (await finish(stack, token2, pyotp.TOTP(other["secret"]).now())).json()["preshared_key"]
    assert psk2 != psk


async def test_start_errors_use_defguard_strings(stack: Stack) -> None:
    d = await setup_device(stack)
    location_id = d["location"].location.id

    async def error(location: int, pubkey: str, method: int = 0) -> tuple[int, str]:
        response = await start(stack, location, pubkey, method)
        return response.status_code, response.json()["error"]

    assert await error(99999, d["pubkey"]) == (400, "location not found")
    assert await error(location_id, generate_keypair()[1]) == (400, "device not found")
    assert await error(location_id, "not a key") == (400, "device not found")
    assert await error(location_id, d["pubkey"], 9) == (400, "invalid MFA method selected")
    for method in (1, 4):  # no email MFA, no phone key for this user
        assert await error(location_id, d["pubkey"], method) == (400, "selected MFA method not available")
    assert await error(location_id, d["pubkey"], 3) == (400, "Select MFA method not available for the device.")
    assert await error(location_id, d["pubkey"], 2) == (400, "selected MFA method not supported by location")

    open_location = await setup_device(stack, mfa="disabled")
    assert await error(open_location["location"].location.id, open_location["pubkey"]) == (400, "MFA not enabled for location")

    # external MFA needs an OpenID provider (tests/test_oidc.py has locations with one)
    with pytest.raises(RpcFailure, match="external MFA needs an OpenID provider"):
        await stack.add_location("external", mfa="external", network="10.99.0.0/24")

    no_totp = await setup_device(stack, totp=False)
    assert await error(no_totp["location"].location.id, no_totp["pubkey"]) == (400, "selected MFA method not available")


async def test_finish_errors(stack: Stack) -> None:
    d = await setup_device(stack)
    location_id = d["location"].location.id
    totp = pyotp.TOTP(d["secret"])
    token = (await start(stack, location_id, d["pubkey"])).json()["token"]

    wrong = str((int(totp.now()) + 1) % 1_000_000).zfill(6)
    response = await finish(stack, token, wrong)
    assert (response.status_code, response.json()) == (401, {"error": "unauthorized"})

    response = await finish(stack, token, None)
    assert (response.status_code, response.json()) == (400, {"error": "TOTP code not provided"})

    response = await finish(stack, "no-such-token", totp.now())
    assert (response.status_code, response.json()) == (400, {"error": "login session not found"})

    assert (await finish(stack, token, totp.now())).status_code == 200
    used = await finish(stack, token, totp.now())
    assert (used.status_code, used.json()) == (400, {"error": "login session not found"})


async def test_expired_login_token(stack: Stack) -> None:
    d = await setup_device(stack)
    token = (await start(stack, d["location"].location.id, d["pubkey"])).json()["token"]
    await asyncio.sleep(LOGIN_TTL_S + 0.5)
    response = await finish(stack, token, pyotp.TOTP(d["secret"]).now())
    assert (response.status_code, response.json()) == (400, {"error": "login session not found"})


async def test_a_new_start_replaces_the_previous_login(stack: Stack) -> None:
    d = await setup_device(stack)
    first = (await start(stack, d["location"].location.id, d["pubkey"])).json()["token"]
    second = (await start(stack, d["location"].location.id, d["pubkey"])).json()["token"]
    code = pyotp.TOTP(d["secret"]).now()
    assert (await finish(stack, first, code)).json() == {"error": "login session not found"}
    assert (await finish(stack, second, code)).status_code == 200


async def test_a_code_is_accepted_once(stack: Stack) -> None:
    d = await setup_device(stack)
    location_id = d["location"].location.id
    code = pyotp.TOTP(d["secret"]).now()
    token = (await start(stack, location_id, d["pubkey"])).json()["token"]
    assert (await finish(stack, token, code)).status_code == 200

    token = (await start(stack, location_id, d["pubkey"])).json()["token"]
    replay = await finish(stack, token, code)
    assert (replay.status_code, replay.json()) == (401, {"error": "unauthorized"})


async def test_one_code_on_two_parallel_logins_succeeds_once(stack: Stack) -> None:
    d = await setup_device(stack)
    location = d["location"].location
    _, second_device = await stack.add_device(d["username"], "phone", location.name)
    token_a = (await start(stack, location.id, d["pubkey"])).json()["token"]
    token_b = (await start(stack, location.id, second_device.pubkey)).json()["token"]
    code = pyotp.TOTP(d["secret"]).now()
    results = await asyncio.gather(*(finish(stack, t, code) for t in (token_a, token_b)))
    assert sorted(r.status_code for r in results) == [200, 401]


async def test_login_dies_after_five_wrong_codes(stack: Stack) -> None:
    d = await setup_device(stack)
    totp = pyotp.TOTP(d["secret"])
    token = (await start(stack, d["location"].location.id, d["pubkey"])).json()["token"]
    wrong = str((int(totp.now()) + 7) % 1_000_000).zfill(6)
    for _ in range(5):
        assert (await finish(stack, token, wrong)).status_code == 401
    dead = await finish(stack, token, totp.now())
    assert (dead.status_code, dead.json()) == (400, {"error": "login session not found"})


async def test_malformed_bodies_get_400_with_a_reason(stack: Stack) -> None:
    url = "/api/v1/client-mfa/start"
    cases = [
        (b"{not json", "invalid JSON"),
        (b"[]", "body"),
        (json.dumps({"location_id": "one", "pubkey": "k", "method": 0}).encode(), "location_id"),
        (json.dumps({"pubkey": "k", "method": 0}).encode(), "location_id: Field required"),
        (json.dumps({"location_id": 1, "pubkey": "k", "method": "0"}).encode(), "method"),
    ]
    for body, reason in cases:
        response = await stack.http.post(url, content=body, headers={"content-type": "application/json"})
        assert response.status_code == 400, body
        assert reason in response.json()["error"], response.json()
    huge = await stack.http.post(url, content=b"x" * 200_000, headers={"content-type": "application/json"})
    assert (huge.status_code, huge.json()) == (413, {"error": "request body too large"})
    missing = await stack.http.get("/api/v1/no-such-route")
    assert (missing.status_code, missing.json()) == (404, {"error": "not found"})


async def test_absurd_numbers_and_unparseable_bodies_get_400_and_big_chunked_bodies_413(stack: Stack) -> None:
    d = await setup_device(stack)
    url = "/api/v1/client-mfa/start"
    for location_id in (2**63, 10**30, -(2**63) - 1, 2**31):
        response = await stack.http.post(url, json={"location_id": location_id, "pubkey": d["pubkey"], "method": 0})
        assert response.status_code == 400, (location_id, response.text)
        assert response.json()["error"].startswith("invalid request: location_id"), response.json()
    response = await stack.http.post(url, json={"location_id": 1, "pubkey": d["pubkey"], "method": 2**64})
    assert response.status_code == 400 and response.json()["error"].startswith("invalid request: method")

    not_utf8 = '{"location_id": 1, "pubkey": "é", "method": 0}'.encode("latin-1")
    nested = b'{"location_id": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    for body, reason in ((not_utf8, "not UTF-8"), (nested, "nested too deeply")):
        response = await stack.http.post(url, content=body, headers={"content-type": "application/json"})
        assert response.status_code in (400, 413), response.text
        if len(body) <= 65536:
            assert response.json()["error"].startswith("invalid request: ") and reason in response.json()["error"]
    nested = b'{"location_id": ' + b"[" * 30_000 + b"]" * 30_000 + b"}"
    response = await stack.http.post(url, content=nested, headers={"content-type": "application/json"})
    assert (response.status_code, response.json()) == (400, {"error": "invalid request: JSON nested too deeply"})

    async def chunks() -> AsyncIterator[bytes]:
        yield b'{"location_id": 1, "pubkey": "'
        for _ in range(100):
            yield b"x" * 1000
        yield b'", "method": 0}'

    chunked = await stack.http.post(url, content=chunks(), headers={"content-type": "application/json"})
    assert (chunked.status_code, chunked.json()) == (413, {"error": "request body too large"})
    # and the proxy goes on serving
    assert (await start(stack, d["location"].location.id, d["pubkey"])).status_code == 200


async def test_no_secret_in_clear_on_the_bus_or_in_logs(stack: Stack, nats_for_module: SecuredNats) -> None:
    capture = await BusCapture().start(stack.nats_url)
    d = await setup_device(stack)
    totp = pyotp.TOTP(d["secret"])
    token = (await start(stack, d["location"].location.id, d["pubkey"])).json()["token"]
    wrong = str((int(totp.now()) + 3) % 1_000_000).zfill(6)
    await finish(stack, token, wrong)
    code = totp.now()
    psk = (await finish(stack, token, code)).json()["preshared_key"]
    await capture.stop()

    assert any(s.startswith(subjects.PEER_PREFIX + ".") for s in capture.subjects())
    assert subjects.RPC_MFA_FINISH in capture.subjects()
    secrets = {"PSK": psk, "TOTP secret": d["secret"], "TOTP code": code, "wrong code": wrong, "login token": token}
    assert_no_secret(capture.text(), secrets, "the bus capture")
    logs = stack.logs() + Path(nats_for_module.log_file).read_text(errors="replace")
    assert "mfa" in logs.lower()
    assert_no_secret(logs, secrets, "the service logs")


async def test_health(stack: Stack) -> None:
    assert (await stack.http.get("/api/v1/health")).json() == {"status": "ok"}
    assert (await stack.http.get("/health")).json() == {"status": "ok"}


async def test_core_down_gives_503(tmp_path: Path) -> None:
    with running_nats() as server:
        stack = Stack(server.url, tmp_path, rpc_timeout_s="1", rate_limit_per_s="0")
        await stack.start()
        try:
            d = await setup_device(stack)
            body = {"location_id": d["location"].location.id, "pubkey": d["pubkey"], "method": 0}

            stack.core.process.send_signal(__import__("signal").SIGSTOP)  # alive, but silent
            try:
                loop = asyncio.get_running_loop()
                began = loop.time()
                response = await stack.http.post("/api/v1/client-mfa/start", json=body)
                assert (response.status_code, response.json()) == (503, {"error": "core unavailable"})
                assert loop.time() - began < 3
            finally:
                stack.core.process.send_signal(__import__("signal").SIGCONT)

            stack.core.stop()  # gone: no responders, answered at once
            response = await stack.http.post("/api/v1/client-mfa/start", json=body)
            assert (response.status_code, response.json()) == (503, {"error": "core unavailable"})

            stack.core.start()
            await stack.wait_core()
            response = await stack.http.post("/api/v1/client-mfa/start", json=body)
            assert response.status_code == 200, response.text
        finally:
            await stack.stop()
