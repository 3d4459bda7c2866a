"""Enrollment of Defguard's desktop and mobile apps, driven with the apps' own request
bodies and headers (docs/guide.md, "Defguard's desktop and mobile apps") through running proxies, core and
nats-server, with a real SMTP server."""
from __future__ import annotations

import asyncio
import base64
import json
import re
import sqlite3
import subprocess
import sys
from collections.abc import AsyncIterator
from datetime import timedelta
from email.utils import parsedate_to_datetime
from pathlib import Path
from typing import Any

import httpx
import pyotp
import pytest
import pytest_asyncio
from nacl.signing import SigningKey

from schemas.sealing import generate_keypair
from schemas import rpc
from schemas.common import utcnow
from tests.support.stack import (
    REPO, BusCapture, SecuredNats, ServiceProcess, Stack, assert_no_secret, eventually, free_port,
)
from wgmfa.smtp_sink import MailSink

pytestmark = pytest.mark.asyncio(loop_scope="module")

JSON = {"Content-Type": "application/json"}  # all the desktop's `start` sends
VERSION_HEADERS = ("defguard-core-version", "defguard-component-version", "defguard-core-connected")
CONFIG_FIELDS = {"network_id", "network_name", "config", "endpoint", "assigned_ip", "pubkey", "allowed_ips",
                 "mfa_enabled", "keepalive_interval"}


class World:
    def __init__(self, stack: Stack, sink: MailSink, https_proxy: str) -> None:
        self.stack = stack
        self.sink = sink
        self.https_proxy = https_proxy  # a second proxy whose public URL is https
        self.n = 0

    async def post(self, path: str, body: Any, headers: dict[str, str] | None = None, proxy: str | None = None) -> httpx.Response:
        """One request as an app makes it: no cookie jar, only the headers given."""
        async with httpx.AsyncClient(base_url=proxy or self.stack.proxy_url, timeout=15) as http:
            return await http.post(path, content=json.dumps(body).encode(), headers=JSON | (headers or {}))

    async def user(self, *, totp: bool = False, email: bool = False) -> str:
        self.n += 1
        username = f"enrollee{self.n}"
        if totp:
            await self.stack.add_user_with_totp(username)
        else:
            await self.stack.admin.call("user_add", rpc.UserAddRequest(username=username, email=f"{username}@example.com"),
                                        rpc.UserInfo)
        if email:
            await self.stack.admin.call("email_mfa", rpc.EmailMfaRequest(username=username, enabled=True), rpc.UserInfo)
        return username

    async def token(self, username: str, ttl_s: int = 3600) -> str:
        admin = self.stack.admin
        created = await admin.call("enroll_create", rpc.EnrollCreateRequest(username=username, ttl_s=ttl_s,
                                                                             reply_key=admin.reply_key.public),
                                   rpc.EnrollCreateResult)
        return admin.reply_key.open(created.token_sealed)

    async def start(self, username: str, proxy: str | None = None) -> tuple[httpx.Response, str]:
        """`enrollment/start` as the desktop sends it; (response, the Set-Cookie string the
        desktop keeps and sends back whole as its Cookie header)."""
        response = await self.post("/api/v1/enrollment/start", {"token": await self.token(username)}, proxy=proxy)
        assert response.status_code == 200, response.text
        cookie = next(c for c in response.headers.get_list("set-cookie") if c.startswith("defguard_proxy="))
        return response, cookie

    async def self_service_totp(self, cookie: str, proxy: str | None = None) -> str:
        started = await self.post("/api/v1/enrollment/register-mfa/code/start", {"method": 0}, {"Cookie": cookie}, proxy)
        assert started.status_code == 200, started.text
        secret = started.json()["totp_secret"]
        # the previous step's code: the current one stays free for a login right after
        code = pyotp.TOTP(secret).at(utcnow() - timedelta(seconds=30))
        finished = await self.post("/api/v1/enrollment/register-mfa/code/finish", {"code": code, "method": 0},
                                   {"Cookie": cookie}, proxy)
        assert (finished.status_code, finished.json()) == (200, {"recovery_codes": []}), finished.text
        return secret

    async def create_device(self, cookie: str, name: str = "laptop", proxy: str | None = None) -> tuple[httpx.Response, str, str]:
        private, public = generate_keypair()
        response = await self.post("/api/v1/enrollment/create_device", {"name": name, "pubkey": public},
                                   {"Cookie": cookie}, proxy)
        return response, private, public

    async def poll(self, token: str, proxy: str | None = None) -> httpx.Response:
        return await self.post("/api/v1/poll", {"token": token},
                               {"defguard-client-version": "1.6.10", "defguard-client-platform": "linux"}, proxy)

    def sql(self, statement: str, *args: Any) -> None:
        """Only to simulate what has no admin command yet (changing a location) or the
        passing of time (an expired token)."""
        with sqlite3.connect(self.stack.state_dir / "core.db") as db:
            db.execute(statement, args)


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def world(nats_for_module: SecuredNats, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[World]:
    sink = MailSink().start()
    work = tmp_path_factory.mktemp("enrollment")
    stack = Stack(nats_for_module.url, work, rate_limit_per_s="0", smtp_host="127.0.0.1", smtp_port=str(sink.port),
                  max_body_bytes="4096")
    stack.env["WGMFA_PUBLIC_URL"] = stack.proxy_url  # what the apps are told to come back to
    await stack.start()
    port = free_port()
    https = ServiceProcess("proxy_service", dict(stack.env, WGMFA_PROXY_PORT=str(port),
                                                 WGMFA_PUBLIC_URL="https://vpn.example.com"), work / "proxy-https.log")
    https.start()
    url = f"http://127.0.0.1:{port}"

    async def healthy() -> bool:
        try:
            return (await stack.http.get(f"{url}/api/v1/health")).status_code == 200
        except httpx.HTTPError:
            return False

    await eventually(healthy, timeout=20, what="the second proxy")
    await stack.add_location("office", network="10.30.0.0/24", endpoint_port=51830)
    await stack.add_location("lab", network="10.31.0.0/24", endpoint_port=51831, mfa="disabled")
    yield World(stack, sink, url)
    https.stop()
    await stack.stop()
    sink.stop()


# --- start ---------------------------------------------------------------------------------


async def test_start_answers_what_the_apps_need_and_sets_the_cookie(world: World) -> None:
    username = await world.user(totp=True)
    response, cookie = await world.start(username)
    body = response.json()
    assert set(body) == {"admin", "user", "deadline_timestamp", "final_page_content", "instance", "settings"}
    assert body["user"]["login"] == username and body["user"]["enrolled"] is True
    assert body["user"]["device_names"] == [] and body["user"]["phone_number"] is None
    assert isinstance(body["admin"]["name"], str) and isinstance(body["admin"]["email"], str)
    instance = body["instance"]
    assert re.fullmatch(r"[0-9a-f-]{36}", instance["id"])
    assert instance["proxy_url"] == world.stack.proxy_url + "/" and instance["username"] == username
    assert isinstance(body["deadline_timestamp"], int) and body["deadline_timestamp"] > utcnow().timestamp() + 500
    attributes = [a.strip().lower() for a in cookie.split(";")]
    assert "httponly" in attributes and "samesite=strict" in attributes and "path=/" in attributes
    assert "secure" not in attributes  # the public URL is plain http
    expires = next(a for a in cookie.split(";") if a.strip().lower().startswith("expires="))
    assert parsedate_to_datetime(expires.split("=", 1)[1]).timestamp() == body["deadline_timestamp"]
    for header in VERSION_HEADERS:
        assert header in response.headers
    assert response.headers["defguard-core-connected"] == "true"
    major, minor, _ = (int(p) for p in response.headers["defguard-component-version"].split("."))
    assert (major, minor) >= (1, 6)


async def test_the_cookie_is_secure_when_the_public_url_is_https(world: World) -> None:
    username = await world.user(totp=True)
    response, cookie = await world.start(username, proxy=world.https_proxy)
    assert "secure" in [a.strip().lower() for a in cookie.split(";")]
    assert response.json()["instance"]["proxy_url"] == "https://vpn.example.com/"


async def test_unknown_reused_expired_and_revoked_tokens_are_refused(world: World) -> None:
    username = await world.user(totp=True)
    unknown = await world.post("/api/v1/enrollment/start", {"token": "no-such-token"})
    assert (unknown.status_code, unknown.json()) == (401, {"error": "invalid token"})
    assert "defguard-core-version" in unknown.headers

    token = await world.token(username)
    assert (await world.post("/api/v1/enrollment/start", {"token": token})).status_code == 200
    reused = await world.post("/api/v1/enrollment/start", {"token": token})
    assert (reused.status_code, reused.json()) == (401, {"error": "invalid token"})

    expired = await world.token(username)
    world.sql("UPDATE enrollment SET expires_at = '2000-01-01 00:00:00' WHERE started_at IS NULL")
    response = await world.post("/api/v1/enrollment/start", {"token": expired})
    assert (response.status_code, response.json()) == (401, {"error": "token expired"})

    revoked = await world.token(username)
    await world.stack.admin.call("enroll_revoke", rpc.EnrollRevokeRequest(enrollment=username), rpc.EnrollRevokeResult)
    response = await world.post("/api/v1/enrollment/start", {"token": revoked})
    assert (response.status_code, response.json()) == (401, {"error": "invalid token"})

    events = await world.stack.read("wgmfa.events.enrollment.failed")
    reasons = {e["reason"] for e in events}
    assert {"unknown_token", "reused_token", "expired_token", "revoked_token"} <= reasons


async def test_missing_and_forged_cookies(world: World) -> None:
    username = await world.user(totp=True)
    _, cookie = await world.start(username)
    _, public = generate_keypair()
    missing = await world.post("/api/v1/enrollment/create_device", {"name": "x", "pubkey": public})
    assert (missing.status_code, missing.json()) == (401, {"error": "Missing authorization header"})
    value = cookie.split(";")[0].split("=", 1)[1]
    flipped = value[:10] + ("A" if value[10] != "A" else "B") + value[11:]
    for forged in (f"defguard_proxy={flipped}", "defguard_proxy=made-up", "defguard_proxy="):
        response = await world.post("/api/v1/enrollment/create_device", {"name": "x", "pubkey": public}, {"Cookie": forged})
        assert response.status_code == 401, (forged, response.text)
    no_token = await world.post("/api/v1/enrollment/register_mobile", {
        "auth_pub_key": base64.b64encode(bytes(32)).decode(), "device_pub_key": public})
    assert (no_token.status_code, no_token.json()) == (400, {"error": "No token present"})
    info = await world.post("/api/v1/enrollment/network_info", {"pubkey": public})
    assert (info.status_code, info.json()) == (401, {"error": "Missing authorization header"})


# --- the user's own factor, the device -----------------------------------------------------


async def test_self_service_totp_then_device_then_login(world: World) -> None:
    capture = await BusCapture().start(world.stack.nats_url)
    username = await world.user()
    response, cookie = await world.start(username)
    assert response.json()["user"]["enrolled"] is False

    started = await world.post("/api/v1/enrollment/register-mfa/code/start", {"method": 0}, {"Cookie": cookie})
    secret = started.json()["totp_secret"]
    assert pyotp.TOTP(secret).now().isdigit()
    wrong = str((int(pyotp.TOTP(secret).now()) + 5) % 1_000_000).zfill(6)
    refused = await world.post("/api/v1/enrollment/register-mfa/code/finish", {"code": wrong, "method": 0},
                               {"Cookie": cookie})
    assert (refused.status_code, refused.json()) == (401, {"error": "invalid code"})
    code = pyotp.TOTP(secret).at(utcnow() - timedelta(seconds=30))
    finished = await world.post("/api/v1/enrollment/register-mfa/code/finish", {"code": code, "method": 0},
                                {"Cookie": cookie})
    assert (finished.status_code, finished.json()) == (200, {"recovery_codes": []})
    # a session cannot replace a factor once there is one
    again = await world.post("/api/v1/enrollment/register-mfa/code/start", {"method": 0}, {"Cookie": cookie})
    assert (again.status_code, again.json()) == (400, {"error": "MFA already configured"})

    created, _, pubkey = await world.create_device(cookie)
    assert created.status_code == 200, created.text
    document = created.json()
    assert set(document) == {"device", "configs", "instance", "token"}
    assert document["device"]["name"] == "laptop" and document["device"]["pubkey"] == pubkey
    assert isinstance(document["device"]["id"], int) and isinstance(document["device"]["created_at"], int)
    configs = {c["network_name"]: c for c in document["configs"]}
    assert set(configs) >= {"office", "lab"}
    for config in configs.values():
        assert CONFIG_FIELDS <= set(config) and config["dns"] is None
        assert isinstance(config["network_id"], int) and isinstance(config["allowed_ips"], str)
    assert configs["office"]["allowed_ips"] == "10.30.0.0/24" and configs["office"]["location_mfa_mode"] == 2
    assert configs["office"]["mfa_enabled"] is True and configs["office"]["endpoint"] == "172.31.0.1:51830"
    assert configs["lab"]["location_mfa_mode"] == 1 and configs["lab"]["mfa_enabled"] is False
    assert configs["office"]["assigned_ip"].startswith("10.30.0.")
    assert len(document["token"]) >= 32 and document["instance"]["proxy_url"].endswith("/")
    await world.post("/api/v1/enrollment/activate_user", {"phone_number": None, "password": "unused-Passw0rd!"},
                     {"Cookie": cookie})

    # then it logs in exactly as today, method 0, with the secret only it has seen
    login = await world.post("/api/v1/client-mfa/start", {
        "location_id": configs["office"]["network_id"], "pubkey": pubkey, "method": 0}, proxy=None)
    assert login.status_code == 200, login.text
    psk = await world.post("/api/v1/client-mfa/finish", {"token": login.json()["token"], "code": pyotp.TOTP(secret).now()})
    assert psk.status_code == 200, psk.text
    await capture.stop()

    events = await world.stack.read("wgmfa.events.>")
    mine = [e for e in events if e.get("username") == username]
    kinds = [e["type"] for e in mine]
    assert "enrollment.started" in kinds and "enrollment.device_created" in kinds
    assert [e["confirmed"] for e in mine if e["type"] == "admin.totp_enrolled"] == [False, True]  # as the admin path
    assert "mfa.succeeded" in kinds
    secrets = {"TOTP secret": secret, "polling token": document["token"], "cookie": cookie.split(";")[0].split("=", 1)[1]}
    assert_no_secret(capture.text(), secrets, "the bus capture")
    assert_no_secret(world.stack.logs(), secrets, "the service logs")


async def test_self_service_email(world: World) -> None:
    username = await world.user()
    _, cookie = await world.start(username)
    before = len(world.sink.received)
    started = await world.post("/api/v1/enrollment/register-mfa/code/start", {"method": 1}, {"Cookie": cookie})
    assert (started.status_code, started.json()) == (200, {"totp_secret": None})
    mail = world.sink.wait_for(before + 1)[before]
    assert mail.to == [f"{username}@example.com"]
    code = re.search(r"\b(\d{6})\b", mail.body).group(1)
    finished = await world.post("/api/v1/enrollment/register-mfa/code/finish", {"code": code, "method": 0},
                                {"Cookie": cookie})
    assert finished.status_code == 200, finished.text
    users = (await world.stack.admin.call("user_list", rpc.Empty(), rpc.UserListResult)).users
    assert next(u for u in users if u.username == username).email_mfa_enabled
    unsupported = await world.post("/api/v1/enrollment/register-mfa/code/start", {"method": 3}, {"Cookie": cookie})
    assert unsupported.status_code == 400


async def test_create_device_refuses_bad_and_taken_keys(world: World) -> None:
    username = await world.user(totp=True)
    _, cookie = await world.start(username)
    created, _, pubkey = await world.create_device(cookie, "first")
    assert created.status_code == 200
    short = base64.b64encode(bytes(31)).decode()
    for key, error in ((pubkey, "invalid key"), ("not base64!", "invalid pubkey"), (short, "invalid pubkey")):
        response = await world.post("/api/v1/enrollment/create_device", {"name": "second", "pubkey": key},
                                    {"Cookie": cookie})
        assert (response.status_code, response.json()) == (400, {"error": error})
    malformed = await world.post("/api/v1/enrollment/create_device", {"name": "second"}, {"Cookie": cookie})
    assert malformed.status_code == 400 and "pubkey" in malformed.json()["error"]
    # newer apps send more fields: ignored
    _, extra = generate_keypair()
    response = await world.post("/api/v1/enrollment/create_device", {"name": "second", "pubkey": extra, "future": 1},
                                {"Cookie": cookie})
    assert response.status_code == 200, response.text


async def test_a_body_over_the_limit(world: World) -> None:
    response = await world.post("/api/v1/enrollment/start", {"token": "x" * 5000})
    assert (response.status_code, response.json()) == (413, {"error": "request body too large"})
    assert "defguard-core-version" in response.headers


# --- following changes ---------------------------------------------------------------------


async def test_poll_follows_admin_changes_and_new_locations(world: World) -> None:
    username = await world.user(totp=True)
    _, cookie = await world.start(username)
    created, _, pubkey = await world.create_device(cookie)
    token = created.json()["token"]
    first = await world.poll(token)
    assert first.status_code == 200 and set(first.json()) == {"device_config"}
    assert "defguard-core-version" in first.headers
    office = next(c for c in first.json()["device_config"]["configs"] if c["network_name"] == "office")
    assert office["location_mfa_mode"] == 2

    # an admin changes the location
    async def set_office(**changes: Any) -> None:
        await world.stack.admin.call("location_set", rpc.LocationSetRequest(location="office", **changes),
                                     rpc.LocationChangeResult)

    await set_office(mfa_mode="disabled", keepalive_s=15, endpoint="vpn.example.com:51830", network="10.30.0.0/23",
                     allowed_ips=["192.168.50.0/24"], dns=["192.168.50.53"])
    changed = next(c for c in (await world.poll(token)).json()["device_config"]["configs"] if c["network_name"] == "office")
    assert (changed["location_mfa_mode"], changed["mfa_enabled"]) == (1, False)
    assert changed["keepalive_interval"] == 15 and changed["endpoint"] == "vpn.example.com:51830"
    assert changed["allowed_ips"] == "10.30.0.0/23,192.168.50.0/24"
    assert "AllowedIPs = 10.30.0.0/23,192.168.50.0/24" in changed["config"]
    assert changed["dns"] == "192.168.50.53" and "DNS = 192.168.50.53" in changed["config"]
    await set_office(mfa_mode="internal", keepalive_s=25, endpoint="172.31.0.1:51830", network="10.30.0.0/24",
                     allowed_ips=[], dns=[])
    again = next(c for c in (await world.poll(token)).json()["device_config"]["configs"] if c["network_name"] == "office")
    assert (again["location_mfa_mode"], again["allowed_ips"], again["dns"]) == (2, "10.30.0.0/24", None)

    await world.stack.add_location(f"new{world.n}", network=f"10.{40 + world.n}.0.0/24", endpoint_port=51900 + world.n)
    names = {c["network_name"] for c in (await world.poll(token)).json()["device_config"]["configs"]}
    assert f"new{world.n}" in names

    unknown = await world.poll("no-such-token")
    assert (unknown.status_code, unknown.json()) == (403, {"error": "invalid token"})


async def test_instance_update_gives_the_config_and_a_new_polling_token(world: World) -> None:
    username = await world.user(totp=True)
    _, cookie = await world.start(username)
    created, _, pubkey = await world.create_device(cookie)
    old = created.json()["token"]
    _, cookie = await world.start(username)  # "Instance Update" starts with a new token
    updated = await world.post("/api/v1/enrollment/network_info", {"pubkey": pubkey}, {"Cookie": cookie})
    assert updated.status_code == 200, updated.text
    assert {c["network_name"] for c in updated.json()["configs"]} >= {"office", "lab"}
    assert (await world.poll(old)).status_code == 403
    assert (await world.poll(updated.json()["token"])).status_code == 200
    stranger = await world.post("/api/v1/enrollment/network_info", {"pubkey": generate_keypair()[1]}, {"Cookie": cookie})
    assert (stranger.status_code, stranger.json()) == (400, {"error": "device not found"})


async def test_two_proxies_share_the_session(world: World) -> None:
    username = await world.user()
    _, cookie = await world.start(username)  # the first proxy
    secret = await world.self_service_totp(cookie, proxy=world.https_proxy)  # the other one
    created, _, pubkey = await world.create_device(cookie, proxy=world.https_proxy)
    assert created.status_code == 200, created.text
    assert (await world.poll(created.json()["token"])).status_code == 200  # and back
    assert secret


# --- the phone ----------------------------------------------------------------------------


async def test_the_mobile_app_registers_its_key_with_the_enrollment_cookie(world: World) -> None:
    username = await world.user(totp=True)
    _, cookie = await world.start(username)
    mobile_cookie = cookie.split(";")[0]  # the mobile app's cookie jar sends name=value
    created, _, phone_pubkey = await world.create_device(mobile_cookie, "phone")
    key = SigningKey.generate()
    auth = base64.b64encode(bytes(key.verify_key)).decode()
    registered = await world.post("/api/v1/enrollment/register_mobile",
                                  {"auth_pub_key": auth, "device_pub_key": phone_pubkey}, {"Cookie": mobile_cookie})
    assert (registered.status_code, registered.content) == (200, b"")
    # someone else's device is not this session's to register
    other = await world.user(totp=True)
    _, other_cookie = await world.start(other)
    hijack = await world.post("/api/v1/enrollment/register_mobile", {
        "auth_pub_key": base64.b64encode(bytes(SigningKey.generate().verify_key)).decode(),
        "device_pub_key": phone_pubkey}, {"Cookie": other_cookie})
    assert (hijack.status_code, hijack.json()) == (400, {"error": "device not found"})
    # the registered key signs a biometric login of the phone's own tunnel
    office = next(c for c in created.json()["configs"] if c["network_name"] == "office")
    started = await world.post("/api/v1/client-mfa/start", {"location_id": office["network_id"], "pubkey": phone_pubkey,
                                                            "method": 3, "posture_data": None})
    challenge = started.json()["challenge"]
    signature = base64.b64encode(key.sign(challenge.encode()).signature).decode()
    finished = await world.post("/api/v1/client-mfa/finish", {"token": started.json()["token"], "code": signature,
                                                              "auth_pub_key": None})
    assert finished.status_code == 200, finished.text


# --- the command line ----------------------------------------------------------------------


async def test_admin_enroll_list_and_revoke_commands(world: World) -> None:
    username = await world.user(totp=True)

    def wgmfa(*args: str) -> subprocess.CompletedProcess[str]:
        env = dict(world.stack.env, WGMFA_PUBLIC_URL=world.stack.proxy_url)
        return subprocess.run([sys.executable, "-m", "wgmfa", *args], env=env, cwd=REPO, capture_output=True,
                              text=True, timeout=60)

    issued = wgmfa("admin", "enroll", username, "--ttl", "2h", "--json")
    assert issued.returncode == 0, issued.stderr
    document = json.loads(issued.stdout)
    assert document["url"] == world.stack.proxy_url and document["deep_link"].startswith("defguard://addinstance?")
    assert json.loads(base64.b64decode(document["qr_payload"])) == {"url": world.stack.proxy_url, "token": document["token"]}
    human = wgmfa("admin", "enroll", username)
    assert human.returncode == 0 and "token:" in human.stdout, human.stderr
    listed = json.loads(wgmfa("admin", "enroll", "list", "--json").stdout)
    assert sum(1 for e in listed if e["username"] == username and e["state"] == "open") == 2
    revoked = wgmfa("admin", "enroll", "revoke", document["enrollment"]["id"])
    assert revoked.returncode == 0, revoked.stderr
    response = await world.post("/api/v1/enrollment/start", {"token": document["token"]})
    assert (response.status_code, response.json()) == (401, {"error": "invalid token"})
    assert wgmfa("admin", "enroll", "revoke", "nobody-at-all").returncode != 0


async def test_the_reference_client_enrolls_through_the_same_routes(world: World, tmp_path: Path) -> None:
    username = await world.user()
    token = await world.token(username)
    output = tmp_path / "device.json"
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "wgmfa", "client", "enroll", world.stack.proxy_url, token, "-o", str(output),
        "--method", "totp", "--name", "workstation", "--location", "office",
        env=world.stack.env, cwd=REPO, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    seen = ""
    while "otpauth://" not in seen:
        line = await asyncio.wait_for(process.stdout.readline(), 30)
        assert line, seen
        seen += line.decode()
    secret = re.search(r"secret=([A-Z2-7]+)", seen).group(1)
    process.stdin.write((pyotp.TOTP(secret).at(utcnow() - timedelta(seconds=30)) + "\n").encode())
    await process.stdin.drain()
    rest = (await asyncio.wait_for(process.communicate(), 30))[0].decode()
    assert process.returncode == 0, seen + rest
    config = json.loads(output.read_text())
    assert (output.stat().st_mode & 0o777) == 0o600
    assert config["device_name"] == "workstation" and config["location_name"] == "office"
    assert config["address"].startswith("10.30.0.") and config["address"].endswith("/24")
    assert config["allowed_ips"] == ["10.30.0.0/24"] and config["mfa_mode"] == "internal"
    assert config["proxy_url"] == world.stack.proxy_url and config["private_key"]
    login = await world.post("/api/v1/client-mfa/start", {"location_id": config["location_id"], "pubkey": config["pubkey"],
                                                          "method": 0})
    finished = await world.post("/api/v1/client-mfa/finish", {"token": login.json()["token"], "code": pyotp.TOTP(secret).now()})
    assert finished.status_code == 200, finished.text


async def test_the_rate_limit_covers_the_new_routes(world: World) -> None:
    port = free_port()
    limited = ServiceProcess("proxy_service", dict(world.stack.env, WGMFA_PROXY_PORT=str(port), WGMFA_RATE_LIMIT_PER_S="0.1",
                                                   WGMFA_RATE_LIMIT_BURST="2"), world.stack.work_dir / "proxy-limited.log")
    limited.start()
    url = f"http://127.0.0.1:{port}"
    try:
        async def healthy() -> bool:
            try:
                return (await world.stack.http.get(f"{url}/api/v1/health")).status_code == 200
            except httpx.HTTPError:
                return False

        await eventually(healthy, timeout=20, what="the rate-limited proxy")
        statuses = []
        for path, body in (("/api/v1/poll", {"token": "t"}), ("/api/v1/enrollment/start", {"token": "t"}),
                           ("/api/v1/enrollment/create_device", {"name": "n", "pubkey": "k"})):
            response = await world.post(path, body, proxy=url)
            statuses.append(response.status_code)
        assert statuses == [403, 401, 429], statuses
        assert "defguard-core-version" in response.headers and "retry-after" in response.headers
    finally:
        limited.stop()


async def test_the_reference_client_sets_up_email_and_skips_a_factor_it_has(world: World, tmp_path: Path) -> None:
    username = await world.user()
    before = len(world.sink.received)
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "wgmfa", "client", "enroll", world.stack.proxy_url, await world.token(username),
        "-o", str(tmp_path / "mail.json"), "--method", "email",
        env=world.stack.env, cwd=REPO, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    mail = (await asyncio.to_thread(world.sink.wait_for, before + 1))[before]
    code = re.search(r"\b(\d{6})\b", mail.body).group(1)
    out = (await asyncio.wait_for(process.communicate(f"{code}\n".encode()), 30))[0].decode()
    assert process.returncode == 0 and "email is set up" in out, out

    # now the user has a factor: a second enrollment asks for nothing
    enrolled = subprocess.run(
        [sys.executable, "-m", "wgmfa", "client", "enroll", world.stack.proxy_url, await world.token(username),
         "-o", str(tmp_path / "second.json"), "--name", "second"],
        env=world.stack.env, cwd=REPO, capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL,
    )
    assert enrolled.returncode == 0, enrolled.stderr + enrolled.stdout
    assert json.loads((tmp_path / "second.json").read_text())["device_name"] == "second"
