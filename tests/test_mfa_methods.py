"""Emailed codes (method 1), biometric (3) and mobile approve (4), end to end through
running proxies, core and nats-server, a real SMTP server and real Ed25519 keys."""
from __future__ import annotations

import asyncio
import base64
import json
import re
import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
import pytest_asyncio
import websockets
import websockets.exceptions
from nacl.signing import SigningKey

from events.peer_log import PeerLog
from events.bus import Bus
from schemas.sealing import generate_keypair, unseal
from schemas import rpc
from schemas.events import PeerAuthorized
from tests.conftest import running_nats
from tests.support.stack import BusCapture, SecuredNats, Stack, assert_no_secret, free_port, read_stream
from wgmfa.smtp_sink import MailSink

pytestmark = pytest.mark.asyncio(loop_scope="module")

LOGIN_TTL_S = 4
CODE = re.compile(r"Your code: (\d{6})")


class World:
    def __init__(self, stack: Stack, sink: MailSink, nats: SecuredNats) -> None:
        self.stack = stack
        self.sink = sink
        self.nats = nats
        self.second_proxy = ""
        self.n = 0

    async def setup(self, *, email: bool = False, devices: tuple[str, ...] = ("laptop",)) -> dict:
        """A location and a user with `devices`; returns names, keys and the location."""
        self.n += 1
        name, username = f"loc{self.n}", f"user{self.n}"
        location = await self.stack.add_location(name, network=f"10.{100 + self.n}.0.0/24")
        await self.stack.admin.call("user_add", rpc.UserAddRequest(username=username, email=f"{username}@example.com"),
                                    rpc.UserInfo)
        if email:
            await self.stack.admin.call("email_mfa", rpc.EmailMfaRequest(username=username, enabled=True), rpc.UserInfo)
        made = {d: (await self.stack.add_device(username, d, name))[1] for d in devices}
        return {"location": location, "username": username, "devices": made,
                "credentials": json.loads(self.stack.admin.reply_key.open(location.credentials_sealed))}

    async def phone_key(self, username: str, device: rpc.DeviceConfig, proxy: str | None = None) -> SigningKey:
        """Allow and register a phone app key for `device`."""
        code = await self.stack.allow_mobile(username, device.device_name)
        key = SigningKey.generate()
        response = await self.stack.http.post(f"{proxy or ''}/api/v1/enrollment/register_mobile",
                                              json={"auth_pub_key": b64(bytes(key.verify_key)), "device_pub_key": device.pubkey,
                                                    "code": code})
        assert response.status_code == 200, response.text
        return key

    async def start(self, d: dict, device: str, method: int, proxy: str = "") -> httpx.Response:
        return await self.stack.http.post(f"{proxy}/api/v1/client-mfa/start", json={
            "location_id": d["location"].location.id, "pubkey": d["devices"][device].pubkey, "method": method})

    async def finish(self, token: str, code: str | None, proxy: str = "") -> httpx.Response:
        body = {"token": token} if code is None else {"token": token, "code": code}
        return await self.stack.http.post(f"{proxy}/api/v1/client-mfa/finish", json=body)

    async def approve(self, token: str, key: SigningKey, challenge: str, proxy: str = "") -> httpx.Response:
        return await self.stack.http.post(f"{proxy}/api/v1/client-mfa/finish-remote", json={
            "token": token, "code": sign(key, challenge), "auth_pub_key": b64(bytes(key.verify_key))})

    def mailed_code(self, count: int) -> tuple[str, object]:
        mail = self.sink.wait_for(count)[count - 1]
        return CODE.search(mail.body).group(1), mail

    def logins(self) -> list[tuple[str, str]]:
        with sqlite3.connect(self.stack.state_dir / "core.db") as db:
            return db.execute("SELECT method, state FROM mfa_login ORDER BY created_at").fetchall()


def b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode()


def sign(key: SigningKey, challenge: str) -> str:
    return b64(key.sign(challenge.encode()).signature)


def ws_url(proxy: str, token: str) -> str:
    return proxy.replace("http://", "ws://") + f"/api/v1/client-mfa/remote?token={token}"


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def world(nats_for_module: SecuredNats, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[World]:
    sink = MailSink().start()
    stack = Stack(nats_for_module.url, tmp_path_factory.mktemp("methods"), login_ttl_s=str(LOGIN_TTL_S),
                  rate_limit_per_s="0", smtp_host="127.0.0.1", smtp_port=str(sink.port))
    await stack.start()
    w = World(stack, sink, nats_for_module)
    _, w.second_proxy = await stack.extra_proxy()
    yield w
    await stack.stop()
    sink.stop()


# --- email ---------------------------------------------------------------------------------


async def test_the_mailed_code_finishes_the_login_once(world: World) -> None:
    d = await world.setup(email=True)
    mails_before = len(world.sink.received)
    started = await world.start(d, "laptop", 1)
    assert started.status_code == 200, started.text
    assert started.json()["challenge"] is None
    code, mail = world.mailed_code(mails_before + 1)
    assert mail.to == [f"{d['username']}@example.com"]
    location = d["location"].location.name
    assert location in mail.subject and "laptop" in mail.subject
    assert location in mail.body and "laptop" in mail.body and "expires at" in mail.body

    finished = await world.finish(started.json()["token"], code)
    assert finished.status_code == 200, finished.text
    psk = finished.json()["preshared_key"]
    assert len(base64.b64decode(psk)) == 32
    used = await world.finish(started.json()["token"], code)
    assert (used.status_code, used.json()) == (400, {"error": "login session not found"})
    again = (await world.start(d, "laptop", 1)).json()["token"]
    replay = await world.finish(again, code)
    assert (replay.status_code, replay.json()) == (401, {"error": "unauthorized"})
    missing = await world.finish(again, None)
    assert (missing.status_code, missing.json()) == (400, {"error": "email MFA code not provided"})


async def test_a_new_start_invalidates_the_mailed_code(world: World) -> None:
    d = await world.setup(email=True)
    before = len(world.sink.received)
    first = (await world.start(d, "laptop", 1)).json()["token"]
    first_code, _ = world.mailed_code(before + 1)
    second = (await world.start(d, "laptop", 1)).json()["token"]
    second_code, _ = world.mailed_code(before + 2)
    assert (await world.finish(first, first_code)).json() == {"error": "login session not found"}
    if first_code != second_code:
        assert (await world.finish(second, first_code)).status_code == 401
    assert (await world.finish(second, second_code)).status_code == 200


async def test_mailed_codes_expire_with_the_login(world: World) -> None:
    d = await world.setup(email=True)
    before = len(world.sink.received)
    token = (await world.start(d, "laptop", 1)).json()["token"]
    code, _ = world.mailed_code(before + 1)
    await asyncio.sleep(LOGIN_TTL_S + 0.5)
    expired = await world.finish(token, code)
    assert (expired.status_code, expired.json()) == (400, {"error": "login session not found"})


async def test_at_most_three_mails_per_user_in_five_minutes(world: World) -> None:
    d = await world.setup(email=True)
    for _ in range(3):
        assert (await world.start(d, "laptop", 1)).status_code == 200
    refused = await world.start(d, "laptop", 1)
    assert (refused.status_code, refused.json()) == (429, {"error": "too many MFA emails; try again later"})
    assert 250 <= int(refused.headers["retry-after"]) <= 301


async def test_email_must_be_enabled_for_the_user(world: World) -> None:
    d = await world.setup(email=False)
    response = await world.start(d, "laptop", 1)
    assert (response.status_code, response.json()) == (400, {"error": "selected MFA method not available"})


async def test_smtp_down_is_503_and_leaves_no_login_pending(tmp_path: Path) -> None:
    with running_nats() as server:
        stack = Stack(server.url, tmp_path, rate_limit_per_s="0", smtp_host="127.0.0.1", smtp_port=str(free_port()))
        await stack.start()
        try:
            location = await stack.add_location("office")
            await stack.admin.call("user_add", rpc.UserAddRequest(username="mia", email="mia@example.com"), rpc.UserInfo)
            await stack.admin.call("email_mfa", rpc.EmailMfaRequest(username="mia", enabled=True), rpc.UserInfo)
            _, device = await stack.add_device("mia", "laptop", "office")
            response = await stack.http.post("/api/v1/client-mfa/start", json={
                "location_id": location.location.id, "pubkey": device.pubkey, "method": 1})
            assert response.status_code == 503
            assert response.json()["error"].startswith("cannot send the MFA email: ")
            with sqlite3.connect(stack.state_dir / "core.db") as db:
                assert db.execute("SELECT state FROM mfa_login").fetchall() == [("expired",)]
        finally:
            await stack.stop()


# --- mobile keys ---------------------------------------------------------------------------


async def test_registering_a_mobile_key(world: World) -> None:
    d = await world.setup(devices=("phone",))
    phone = d["devices"]["phone"]
    key = b64(bytes(SigningKey.generate().verify_key))
    url = "/api/v1/enrollment/register_mobile"

    async def register(auth: str, device: str, code: str | None = "x" * 22) -> tuple[int, dict]:
        body = {"auth_pub_key": auth, "device_pub_key": device} | ({"code": code} if code else {})
        response = await world.stack.http.post(url, json=body)
        return response.status_code, response.json() if response.content else None

    assert await register("short", phone.pubkey) == (400, {"error": "Invalid biometric public key."})
    assert await register(key, "not-base64!") == (400, {"error": "Invalid device public key."})
    assert await register(key, generate_keypair()[1]) == (400, {"error": "device not found"})
    status, body = await register(key, phone.pubkey)
    assert status == 403 and "wgmfa admin mobile allow" in body["error"]
    code = await world.stack.allow_mobile(d["username"], "phone")
    # knowing the device's public key is not enough: no code, or a wrong one, is refused
    assert await register(key, phone.pubkey, code=None) == (400, {"error": "No token present"})
    assert await register(key, phone.pubkey, code="guessed") == (403, {"error": "invalid registration code"})
    assert await register(key, phone.pubkey, code=code) == (200, None)
    assert (await register(key, phone.pubkey, code=code))[0] == 403  # the allowance was used up
    malformed = await world.stack.http.post(url, json={"auth_pub_key": key})
    assert malformed.status_code == 400 and "device_pub_key" in malformed.json()["error"]


async def test_wrong_registration_codes_withdraw_the_allowance(world: World) -> None:
    """The register_mobile hijack: during an allowance, someone who knows the device's
    public key tries codes; after five wrong ones even the real code is refused."""
    d = await world.setup(devices=("phone",))
    phone = d["devices"]["phone"]
    code = await world.stack.allow_mobile(d["username"], "phone")
    attacker = b64(bytes(SigningKey.generate().verify_key))
    for attempt in range(5):
        response = await world.stack.http.post("/api/v1/enrollment/register_mobile", json={
            "auth_pub_key": attacker, "device_pub_key": phone.pubkey, "code": f"guess-{attempt}"})
        assert response.status_code == 403, response.text
    real = await world.stack.http.post("/api/v1/enrollment/register_mobile", json={
        "auth_pub_key": b64(bytes(SigningKey.generate().verify_key)), "device_pub_key": phone.pubkey, "code": code})
    assert real.status_code == 403 and "wgmfa admin mobile allow" in real.json()["error"]
    # and no key was registered: biometric is not available for the device
    started = await world.start(d, "phone", 3)
    assert started.json() == {"error": "Select MFA method not available for the device."}


# --- biometric -----------------------------------------------------------------------------


async def test_biometric_a_phone_authorizes_its_own_tunnel(world: World) -> None:
    d = await world.setup(devices=("phone", "tablet"))
    key = await world.phone_key(d["username"], d["devices"]["phone"])
    assert (await world.start(d, "tablet", 3)).json() == {"error": "Select MFA method not available for the device."}

    started = (await world.start(d, "phone", 3)).json()
    assert len(started["challenge"]) == 44 and started["challenge"].isalnum()
    assert (await world.finish(started["token"], None)).json() == {"error": "Challenge not found in request"}
    stranger = SigningKey.generate()
    wrong = await world.finish(started["token"], sign(stranger, started["challenge"]))
    assert (wrong.status_code, wrong.json()) == (401, {"error": "unauthorized"})
    signature = sign(key, started["challenge"])
    finished = await world.finish(started["token"], signature)
    assert finished.status_code == 200, finished.text
    state = (await _last_state(world, d["location"].location.id, d["devices"]["phone"].device_id))
    assert unseal(d["credentials"]["sealing_private_key"], state.psk_sealed).decode() == finished.json()["preshared_key"]

    # the signature of an old challenge is worth nothing for a new login
    again = (await world.start(d, "phone", 3)).json()
    assert again["challenge"] != started["challenge"]
    assert (await world.finish(again["token"], signature)).status_code == 401

    # a challenge dies with its login
    late = (await world.start(d, "phone", 3)).json()
    await asyncio.sleep(LOGIN_TTL_S + 0.5)
    expired = await world.finish(late["token"], sign(key, late["challenge"]))
    assert (expired.status_code, expired.json()) == (400, {"error": "login session not found"})


async def _last_state(world: World, location_id: int, device_id: int) -> PeerAuthorized:
    bus = await Bus.connect(world.stack.nats_url, "test", wait_s=5)
    try:
        record = await PeerLog(bus).last_peer_state(location_id, device_id)
    finally:
        await bus.close()
    assert isinstance(record.state, PeerAuthorized)
    return record.state


# --- mobile approve ------------------------------------------------------------------------


async def test_a_phone_approves_a_desktop_login_through_another_proxy(world: World) -> None:
    d = await world.setup(devices=("laptop", "phone"))
    key = await world.phone_key(d["username"], d["devices"]["phone"])
    capture = await BusCapture().start(world.stack.nats_url)
    started = (await world.start(d, "laptop", 4)).json()
    token, challenge = started["token"], started["challenge"]
    async with websockets.connect(ws_url(world.stack.proxy_url, token)) as socket:
        await asyncio.sleep(0.3)
        approved = await world.approve(token, key, challenge, proxy=world.second_proxy)
        assert (approved.status_code, approved.json()) == (200, {})
        frame = json.loads(await asyncio.wait_for(socket.recv(), 10))
        with pytest.raises(websockets.exceptions.ConnectionClosedOK):
            await asyncio.wait_for(socket.recv(), 5)
    assert frame["type"] == "mfa_success" and len(base64.b64decode(frame["preshared_key"])) == 32
    state = await _last_state(world, d["location"].location.id, d["devices"]["laptop"].device_id)
    assert unseal(d["credentials"]["sealing_private_key"], state.psk_sealed).decode() == frame["preshared_key"]
    await capture.stop()
    notify = [data for subject, data, _ in capture.messages if subject.startswith("wgmfa.notify.login.")]
    assert len(notify) == 1 and json.loads(notify[0])["type"] == "login.approved"
    secrets = {"PSK": frame["preshared_key"], "signature": sign(key, challenge), "token": token,
               "phone key": b64(bytes(key))}
    assert_no_secret(capture.text(), secrets, "the bus capture")
    assert_no_secret(world.stack.logs() + Path(world.nats.log_file).read_text(), secrets, "the logs")

    # the same approval again: the login is no longer waiting
    replayed = await world.approve(token, key, challenge, proxy=world.second_proxy)
    assert (replayed.status_code, replayed.json()) == (400, {"error": "login session not found"})


async def test_only_a_key_of_the_same_user_can_approve(world: World) -> None:
    d = await world.setup(devices=("laptop", "phone"))
    other = await world.setup(devices=("phone",))
    await world.phone_key(d["username"], d["devices"]["phone"])
    stranger_key = await world.phone_key(other["username"], other["devices"]["phone"])
    started = (await world.start(d, "laptop", 4)).json()
    refused = await world.approve(started["token"], stranger_key, started["challenge"])
    assert (refused.status_code, refused.json()) == (400, {"error": "Arguments invalid"})
    unregistered = await world.approve(started["token"], SigningKey.generate(), started["challenge"])
    assert unregistered.json() == {"error": "Arguments invalid"}
    no_signature = await world.stack.http.post("/api/v1/client-mfa/finish-remote", json={"token": started["token"]})
    assert no_signature.json() == {"error": "Signature not found in request"}


async def test_a_bad_signature_counts_against_the_login(world: World) -> None:
    d = await world.setup(devices=("laptop", "phone"))
    key = await world.phone_key(d["username"], d["devices"]["phone"])
    started = (await world.start(d, "laptop", 4)).json()
    forged = {"token": started["token"], "code": sign(key, "another challenge"), "auth_pub_key": b64(bytes(key.verify_key))}
    for _ in range(5):
        response = await world.stack.http.post("/api/v1/client-mfa/finish-remote", json=forged)
        assert (response.status_code, response.json()) == (401, {"error": "unauthorized"})
    dead = await world.approve(started["token"], key, started["challenge"])
    assert dead.json() == {"error": "login session not found"}
    assert world.logins()[-1] == ("mobile_approve", "failed")


async def test_an_expired_challenge_cannot_be_approved_or_waited_for(world: World) -> None:
    d = await world.setup(devices=("laptop", "phone"))
    key = await world.phone_key(d["username"], d["devices"]["phone"])
    started = (await world.start(d, "laptop", 4)).json()
    await asyncio.sleep(LOGIN_TTL_S + 0.5)
    late = await world.approve(started["token"], key, started["challenge"])
    assert (late.status_code, late.json()) == (400, {"error": "login session not found"})
    with pytest.raises(websockets.exceptions.InvalidStatus) as refused:
        async with websockets.connect(ws_url(world.stack.proxy_url, started["token"])):
            pass
    assert refused.value.response.status_code == 401
    assert json.loads(refused.value.response.body) == {"error": "login session not found"}


async def test_a_socket_that_closes_early_gets_nothing_and_a_new_one_gets_the_psk(world: World) -> None:
    d = await world.setup(devices=("laptop", "phone"))
    key = await world.phone_key(d["username"], d["devices"]["phone"])
    started = (await world.start(d, "laptop", 4)).json()
    async with websockets.connect(ws_url(world.stack.proxy_url, started["token"])):
        await asyncio.sleep(0.2)
    assert (await world.approve(started["token"], key, started["challenge"])).status_code == 200
    await asyncio.sleep(1)
    sessions = (await world.stack.admin.call("sessions", rpc.SessionsRequest(location=d["location"].location.name),
                                             rpc.SessionsResult)).sessions
    assert sessions == []  # nobody took the PSK
    async with websockets.connect(ws_url(world.second_proxy, started["token"])) as socket:
        frame = json.loads(await asyncio.wait_for(socket.recv(), 10))
    assert frame["type"] == "mfa_success"
    # the desktop cannot just ask for it without a socket either, once it was taken
    assert (await world.finish(started["token"], None)).json() == {"error": "login session not found"}


async def test_waiting_needs_a_valid_token(world: World) -> None:
    for url in (world.stack.proxy_url.replace("http://", "ws://") + "/api/v1/client-mfa/remote",
                ws_url(world.stack.proxy_url, "no-such-token")):
        with pytest.raises(websockets.exceptions.InvalidStatus) as refused:
            async with websockets.connect(url):
                pass
        assert refused.value.response.status_code in (400, 401)


async def test_email_and_biometric_flows_leave_no_secret_on_the_bus_or_in_logs(world: World) -> None:
    capture = await BusCapture().start(world.stack.nats_url)
    d = await world.setup(email=True, devices=("laptop", "phone"))
    before = len(world.sink.received)
    token = (await world.start(d, "laptop", 1)).json()["token"]
    code, _ = world.mailed_code(before + 1)
    psk_email = (await world.finish(token, code)).json()["preshared_key"]
    key = await world.phone_key(d["username"], d["devices"]["phone"])
    started = (await world.start(d, "phone", 3)).json()
    signature = sign(key, started["challenge"])
    psk_phone = (await world.finish(started["token"], signature)).json()["preshared_key"]
    await capture.stop()
    secrets = {"emailed code": code, "email PSK": psk_email, "login token": token, "signature": signature,
               "biometric PSK": psk_phone, "biometric token": started["token"], "phone key": b64(bytes(key))}
    assert_no_secret(capture.text(), secrets, "the bus capture")
    assert_no_secret(world.stack.logs() + Path(world.nats.log_file).read_text(), secrets, "the logs")
    sent = [e for e in await _events(world) if e["type"] == "mfa.email_sent"]
    assert sent and "@example.com" in sent[-1]["to"] and d["username"] not in sent[-1]["to"]


async def _events(world: World) -> list[dict]:
    bus = await Bus.connect(world.stack.nats_url, "test", wait_s=5)
    try:
        return await read_stream(bus, "wgmfa.events.>")
    finally:
        await bus.close()
