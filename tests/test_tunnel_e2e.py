"""End to end on real WireGuard: network namespaces joined by a bridge, wireguard-go on
both sides, every service a real process. Root only."""
from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import json
import re
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from datetime import timedelta
from pathlib import Path

import httpx
import pyotp
import pytest
import pytest_asyncio

from events.peer_log import PeerLog
from events import subjects
from events.bus import Bus
from schemas.sealing import generate_keypair, generate_psk, seal
from schemas.signing import PeerSigner
from wireguard.port import InterfaceConfig, PeerConfig
from wireguard.userspace import UserspaceBackend
from schemas import rpc
from schemas.common import utcnow, uuid7
from schemas.events import PeerAuthorized
from tests.conftest import running_nats
from tests.support.netns import Topology
from tests.support.stack import REPO, ServiceProcess, Stack, eventually, read_stream
from wgmfa.client import client_config, interface_name
from wgmfa.smtp_sink import MailSink

pytestmark = [pytest.mark.root, pytest.mark.asyncio(loop_scope="module")]

STATS_INTERVAL = 2
MIN_THRESHOLD = 6
THRESHOLD = MIN_THRESHOLD + 2 * STATS_INTERVAL  # the floor
SETTINGS = {"stats_interval": str(STATS_INTERVAL), "min_threshold_s": str(MIN_THRESHOLD), "sweep_interval_s": "1",
            "rate_limit_per_s": "0"}


class World:
    def __init__(self, stack: Stack, net: Topology, work: Path, sink: MailSink) -> None:
        self.stack = stack
        self.net = net
        self.work = work
        self.sink = sink
        self.reaper = ServiceProcess("reaper_worker", stack.env, work / "reaper.log")
        self.gateways: dict[str, ServiceProcess] = {}
        self.methods_location: rpc.LocationAddResult | None = None

    async def location_for_methods(self) -> rpc.LocationAddResult:
        """One location with its gateway, shared by the per-factor tunnel tests."""
        if self.methods_location is None:
            self.methods_location = await self.stack.add_location("factors", network="10.69.0.0/24", endpoint_port=51823)
            self.gateway(self.methods_location).start()
        return self.methods_location

    async def client_process(self, *args: str) -> asyncio.subprocess.Process:
        return await asyncio.create_subprocess_exec(
            sys.executable, "-m", "wgmfa", *args, env=self.stack.env, cwd=REPO,
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
        )

    def gateway(self, location: rpc.LocationAddResult, gateway_id: str = "gw1") -> ServiceProcess:
        credentials = self.work / f"gateway-{location.location.id}.json"
        credentials.write_text(self.stack.admin.reply_key.open(location.credentials_sealed))
        self.stack.allow_gateway(location.location.id, gateway_id)
        process = ServiceProcess(
            "gateway_worker", self.stack.env, self.work / f"gateway-{location.location.id}-{gateway_id}.log",
            args=["--credentials", str(credentials), "--netns", self.net.gateway, "--gateway-id", gateway_id,
                  "--interface", self.net.name(f"g{location.location.id}")],
        )
        self.gateways[f"{location.location.id}/{gateway_id}"] = process
        return process

    def interface(self, location_id: int) -> UserspaceBackend:
        backend = UserspaceBackend()
        backend.config = InterfaceConfig(self.net.name(f"g{location_id}"), "", 0, "", netns=self.net.gateway)
        return backend

    async def peer_at_gateway(self, location_id: int, pubkey: str):  # type: ignore[no-untyped-def]
        try:
            peers = (await self.interface(location_id).status()).peers
        except Exception:
            return None
        return next((p for p in peers if p.public_key == pubkey), None)

    async def device_config(self, username: str, device: str, location: str) -> Path:
        private, config = await self.stack.add_device(username, device, location)
        document = config.model_dump(mode="json") | {"private_key": private, "proxy_url": self.stack.proxy_url}
        path = self.work / f"{username}-{device}-{location}.json"
        path.write_text(json.dumps(document))
        return path

    def wgmfa(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "wgmfa", *args], env=self.stack.env, cwd=REPO,
                              capture_output=True, text=True, timeout=90)


@contextlib.asynccontextmanager
async def running_world(work: Path) -> AsyncIterator[World]:
    """The whole system with a reaper, an SMTP sink and network namespaces; gateways are
    started by the tests, and stopped here."""
    sink = MailSink().start()
    with running_nats() as nats, Topology() as net:
        stack = Stack(nats.url, work, smtp_host="127.0.0.1", smtp_port=str(sink.port), **SETTINGS)
        await stack.start()
        w = World(stack, net, work, sink)
        w.reaper.start()
        yield w
        for process in w.gateways.values():
            process.stop()
        w.reaper.stop()
        await stack.stop()
    sink.stop()


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def world(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[World]:
    async with running_world(tmp_path_factory.mktemp("e2e")) as w:
        yield w


def allowed_code(allowed: subprocess.CompletedProcess[str]) -> str:
    """The one-time registration code `wgmfa admin mobile allow --json` printed."""
    assert allowed.returncode == 0, allowed.stderr
    return json.loads(allowed.stdout)["code"]


async def wait_for_next_totp_step() -> None:
    await asyncio.sleep(30.5 - time.time() % 30)


async def test_mfa_opens_a_real_tunnel_and_silence_closes_it(world: World) -> None:
    net, stack = world.net, world.stack
    laptop_net, thief_net = net.add_client(), net.add_client()
    location = await stack.add_location("e2e", network="10.66.0.0/24", endpoint_port=51820, threshold_s=THRESHOLD)
    secret = await stack.add_user_with_totp("erin")
    config_path = await world.device_config("erin", "laptop", "e2e")
    config = json.loads(config_path.read_text())
    world.gateway(location).start()
    laptop_if = net.name("c1")

    def connect(netns: str, interface: str) -> subprocess.CompletedProcess[str]:
        return world.wgmfa("client", "connect", "--config", str(config_path), "--code", pyotp.TOTP(secret).now(),
                           "--netns", netns, "--interface", interface)

    # MFA, then a real handshake and traffic through the tunnel
    connected = connect(laptop_net.netns, laptop_if)
    assert connected.returncode == 0, connected.stderr + connected.stdout
    assert "connected" in connected.stdout
    assert net.ping(laptop_net.netns, "10.66.0.1", count=2)
    first_psk = (await world.peer_at_gateway(location.location.id, config["pubkey"])).preshared_key
    assert first_psk is not None

    # the client goes silent: after threshold + 2 stats intervals + 5 s the peer is gone
    last_handshake = (await world.peer_at_gateway(location.location.id, config["pubkey"])).latest_handshake
    net.set_link(laptop_net, up=False)
    await eventually(lambda: _gone(world, location.location.id, config["pubkey"]),
                     timeout=THRESHOLD + 2 * STATS_INTERVAL + 10, interval=0.25, what="the reaper to remove the peer")
    assert time.time() - last_handshake <= THRESHOLD + 2 * STATS_INTERVAL + 5 + 1  # (1 s: handshake times are whole seconds)
    net.set_link(laptop_net, up=True)
    assert not net.ping(laptop_net.netns, "10.66.0.1", wait_s=2)
    sessions = (await stack.admin.call("sessions", rpc.SessionsRequest(location="e2e"), rpc.SessionsResult)).sessions
    assert [(s.state.value, s.revoke_reason) for s in sessions] == [("revoked", "idle")]

    # the next connection needs MFA again, with a new code
    await wait_for_next_totp_step()
    again = connect(laptop_net.netns, laptop_if)
    assert again.returncode == 0, again.stderr + again.stdout
    assert net.ping(laptop_net.netns, "10.66.0.1", count=2)

    disconnected = world.wgmfa("client", "disconnect", "--interface", laptop_if)
    assert disconnected.returncode == 0, disconnected.stderr

    # while the session is live, a second client with the device key but the old PSK
    # cannot handshake
    assert (await world.peer_at_gateway(location.location.id, config["pubkey"])).preshared_key not in (None, first_psk)
    thief = UserspaceBackend()
    await thief.ensure_interface(InterfaceConfig(net.name("c2"), config["private_key"], 0, config["address"], netns=thief_net.netns))
    await thief.set_peer(PeerConfig(config["server_pubkey"], first_psk, tuple(config["allowed_ips"]), 1, config["endpoint"]))
    await asyncio.sleep(7)  # more than wireguard-go's handshake retry
    assert all(p.latest_handshake == 0 for p in (await thief.status()).peers)
    assert not net.ping(thief_net.netns, "10.66.0.1", wait_s=2)
    await thief.remove_interface()


async def _gone(world: World, location_id: int, pubkey: str) -> bool:
    return await world.peer_at_gateway(location_id, pubkey) is None


async def test_a_location_without_mfa_keeps_its_peers(world: World) -> None:
    net, stack = world.net, world.stack
    client_net = net.add_client()
    location = await stack.add_location("open", mfa="disabled", network="10.67.0.0/24", endpoint_port=51821, threshold_s=THRESHOLD)
    await stack.admin.call("user_add", rpc.UserAddRequest(username="olga", email="olga@example.com"), rpc.UserInfo)
    config_path = await world.device_config("olga", "desktop", "open")
    config = json.loads(config_path.read_text())
    world.gateway(location).start()
    peer = await eventually(lambda: world.peer_at_gateway(location.location.id, config["pubkey"]), timeout=20,
                            what="the peer on the gateway")
    assert peer.preshared_key is None  # from the moment it was added, without PSK

    connected = world.wgmfa("client", "connect", "--config", str(config_path), "--netns", client_net.netns,
                            "--interface", net.name("c9"))
    assert connected.returncode == 0, connected.stderr + connected.stdout
    net.set_link(client_net, up=False)
    await asyncio.sleep(THRESHOLD + 2 * STATS_INTERVAL + 5)  # silent for longer than any threshold
    net.set_link(client_net, up=True)
    assert await world.peer_at_gateway(location.location.id, config["pubkey"]) is not None
    assert net.ping(client_net.netns, "10.67.0.1", count=2, wait_s=3)


async def test_a_gateway_restart_converges_and_keeps_live_sessions(world: World) -> None:
    net, stack = world.net, world.stack
    client_net = net.add_client()
    location = await stack.add_location("restart", network="10.68.0.0/24", endpoint_port=51822, threshold_s=300)
    secret = await stack.add_user_with_totp("rita")
    stays_path = await world.device_config("rita", "laptop", "restart")
    stays = json.loads(stays_path.read_text())
    gateway = world.gateway(location)
    gateway.start()
    connected = world.wgmfa("client", "connect", "--config", str(stays_path), "--code", pyotp.TOTP(secret).now(),
                            "--netns", client_net.netns, "--interface", net.name("c8"))
    assert connected.returncode == 0, connected.stderr + connected.stdout
    before = await world.peer_at_gateway(location.location.id, stays["pubkey"])
    assert before.latest_handshake > 0

    # while the gateway is down, one device is authorized and then revoked, another authorized
    gateway.stop()
    devices = {}
    for username in ("goes", "comes"):
        user_secret = await stack.add_user_with_totp(username)
        _, device = await stack.add_device(username, "phone", "restart")
        token = (await stack.http.post("/api/v1/client-mfa/start", json={"location_id": location.location.id, "pubkey": device.pubkey, "method": 0})).json()["token"]
        finished = await stack.http.post("/api/v1/client-mfa/finish", json={"token": token, "code": pyotp.TOTP(user_secret).now()})
        assert finished.status_code == 200, finished.text
        devices[username] = device
    goes, comes = devices["goes"], devices["comes"]
    sessions = (await stack.admin.call("sessions", rpc.SessionsRequest(location="restart"), rpc.SessionsResult)).sessions
    goes_session = next(s for s in sessions if s.username == "goes")
    await stack.admin.call("revoke", rpc.RevokeRequest(session_id=goes_session.id), rpc.SessionInfo)
    assert await world.peer_at_gateway(location.location.id, comes.pubkey) is None  # nobody applied it yet

    gateway.start()
    await eventually(lambda: world.peer_at_gateway(location.location.id, comes.pubkey), timeout=20, what="resync")
    assert await world.peer_at_gateway(location.location.id, goes.pubkey) is None
    after = await world.peer_at_gateway(location.location.id, stays["pubkey"])
    assert after.preshared_key == before.preshared_key
    assert after.latest_handshake >= before.latest_handshake and after.rx_bytes >= before.rx_bytes  # not re-added
    assert net.ping(client_net.netns, "10.68.0.1", count=2)


async def test_a_forged_authorization_never_reaches_the_interface(world: World) -> None:
    """Someone who can publish on the peer subjects but is not the core (a stolen reaper
    key, say): unsigned, re-signed, altered and unfit authorizations are refused by the
    gateway, and the real interface keeps the device exactly as it was."""
    net, stack = world.net, world.stack
    client_net = net.add_client()
    location = await stack.add_location("forged", network="10.70.0.0/24", endpoint_port=51824, threshold_s=300)
    location_id = location.location.id
    secret = await stack.add_user_with_totp("fred")
    config_path = await world.device_config("fred", "laptop", "forged")
    config = json.loads(config_path.read_text())
    world.gateway(location).start()
    connected = world.wgmfa("client", "connect", "--config", str(config_path), "--code", pyotp.TOTP(secret).now(),
                            "--netns", client_net.netns, "--interface", net.name("c7"))
    assert connected.returncode == 0, connected.stderr + connected.stdout
    before = await world.peer_at_gateway(location_id, config["pubkey"])
    assert before is not None and before.preshared_key is not None

    publisher = await Bus.connect(stack.nats_url, "test-forger", wait_s=5)  # may publish anything
    try:
        record = await PeerLog(publisher).last_peer_state(location_id, config["device_id"])
        genuine = record.state
        assert isinstance(genuine, PeerAuthorized) and genuine.signature
        stranger = generate_keypair()[1]
        next_generation = genuine.generation + 1
        unsigned = genuine.model_copy(update={"event_id": uuid7(), "generation": next_generation, "signature": None,
                                              "psk_sealed": seal(location.location.sealing_pubkey, generate_psk())})
        forged = {
            "unsigned": unsigned,
            "signed with another key": PeerSigner(b"f" * 32).sign(unsigned),
            "altered after signing": genuine.model_copy(update={"event_id": uuid7(), "generation": next_generation,
                                                                "allowed_ips": ["10.70.0.0/24"]}),
            "a stranger's key, no PSK": unsigned.model_copy(update={"pubkey": stranger, "psk_sealed": None,
                                                                    "threshold_s": None}),
        }
        for what, state in forged.items():
            failures_before = len(await read_stream(publisher, subjects.event("gateway.apply_failed")))
            state = state.model_copy(update={"event_id": uuid7()})  # each its own message (not in the signature)
            await publisher.publish(subjects.peer(location_id, state.device_id), state)

            async def refused() -> bool:
                return len(await read_stream(publisher, subjects.event("gateway.apply_failed"))) > failures_before

            await eventually(refused, timeout=20, what=f"the gateway to refuse the {what} authorization")
            now = await world.peer_at_gateway(location_id, config["pubkey"])
            assert now is not None, what
            assert (now.preshared_key, now.allowed_ips) == (before.preshared_key, before.allowed_ips), what
            assert await world.peer_at_gateway(location_id, stranger) is None, what
        letters = await read_stream(publisher, subjects.DLQ_ALL)
        assert {l["original_subject"] for l in letters} >= {subjects.peer(location_id, config["device_id"])}
        assert net.ping(client_net.netns, "10.70.0.1", count=2)  # the real session lives on
    finally:
        await publisher.close()


async def read_until(process: asyncio.subprocess.Process, needle: str, timeout: float = 30) -> str:
    """The client's output up to the line holding `needle`."""
    seen = []
    async def lines() -> str:
        while True:
            raw = await process.stdout.readline()
            if not raw:
                raise AssertionError("the client exited:\n" + "".join(seen))
            seen.append(raw.decode())
            if needle in seen[-1]:
                return seen[-1]
    return await asyncio.wait_for(lines(), timeout)


async def finished(process: asyncio.subprocess.Process, timeout: float = 60) -> str:
    out, _ = await asyncio.wait_for(process.communicate(), timeout)
    return out.decode()


async def test_an_emailed_code_opens_a_real_tunnel(world: World) -> None:
    net, stack = world.net, world.stack
    client_net = net.add_client()
    location = await world.location_for_methods()
    await stack.admin.call("user_add", rpc.UserAddRequest(username="emil", email="emil@example.com"), rpc.UserInfo)
    await stack.admin.call("email_mfa", rpc.EmailMfaRequest(username="emil", enabled=True), rpc.UserInfo)
    config = await world.device_config("emil", "laptop", location.location.name)
    before = len(world.sink.received)
    client = await world.client_process("client", "connect", "--config", str(config), "--method", "email",
                                        "--netns", client_net.netns, "--interface", net.name("e1"))
    await read_until(client, "a code is on its way")
    mail = await asyncio.to_thread(world.sink.wait_for, before + 1)
    code = re.search(r"Your code: (\d{6})", mail[-1].body).group(1)
    client.stdin.write(f"{code}\n".encode())
    await client.stdin.drain()
    output = await finished(client)
    assert client.returncode == 0 and "connected" in output, output
    assert net.ping(client_net.netns, "10.69.0.1", count=2)
    world.wgmfa("client", "disconnect", "--interface", net.name("e1"))


async def test_a_phone_opens_its_own_tunnel_with_its_signing_key(world: World) -> None:
    net, stack = world.net, world.stack
    client_net = net.add_client()
    location = await world.location_for_methods()
    await stack.admin.call("user_add", rpc.UserAddRequest(username="bea", email="bea@example.com"), rpc.UserInfo)
    config = await world.device_config("bea", "phone", location.location.name)
    key_file = world.work / "bea-phone.key"
    code = allowed_code(world.wgmfa("admin", "mobile", "allow", "bea", "phone", "--json"))
    registered = world.wgmfa("mobile", "register", "--config", str(config), "--key-file", str(key_file), "--code", code)
    assert registered.returncode == 0, registered.stderr
    connected = world.wgmfa("client", "connect", "--config", str(config), "--method", "biometric", "--key-file",
                            str(key_file), "--netns", client_net.netns, "--interface", net.name("b1"))
    assert connected.returncode == 0 and "connected" in connected.stdout, connected.stderr + connected.stdout
    assert net.ping(client_net.netns, "10.69.0.1", count=2)
    world.wgmfa("client", "disconnect", "--interface", net.name("b1"))


async def test_a_phone_approves_a_desktop_tunnel_from_its_qr_code(world: World) -> None:
    net, stack = world.net, world.stack
    desktop_net = net.add_client()
    location = await world.location_for_methods()
    await stack.admin.call("user_add", rpc.UserAddRequest(username="max", email="max@example.com"), rpc.UserInfo)
    desktop = await world.device_config("max", "desktop", location.location.name)
    phone = await world.device_config("max", "phone", location.location.name)
    key_file = world.work / "max-phone.key"
    code = allowed_code(world.wgmfa("admin", "mobile", "allow", "max", "phone", "--json"))
    assert world.wgmfa("mobile", "register", "--config", str(phone), "--key-file", str(key_file),
                       "--code", code).returncode == 0

    client = await world.client_process("client", "connect", "--config", str(desktop), "--method", "mobile",
                                        "--netns", desktop_net.netns, "--interface", net.name("m1"))
    line = await read_until(client, "wgmfa mobile approve")
    payload = re.search(r"wgmfa mobile approve (\S+)", line).group(1)
    qr = json.loads(base64.b64decode(payload))
    assert set(qr) == {"token", "challenge", "instance_id"} and qr["instance_id"]
    approved = await asyncio.to_thread(world.wgmfa, "mobile", "approve", payload, "--key-file", str(key_file),
                                       "--config", str(phone))
    assert approved.returncode == 0 and "approved" in approved.stdout, approved.stderr
    output = await finished(client)
    assert client.returncode == 0 and "connected" in output, output
    assert net.ping(desktop_net.netns, "10.69.0.1", count=2)
    world.wgmfa("client", "disconnect", "--interface", net.name("m1"))


async def test_the_client_offers_the_factors_and_moves_past_one_not_set_up(world: World) -> None:
    net, stack = world.net, world.stack
    client_net = net.add_client()
    location = await world.location_for_methods()
    secret = await stack.add_user_with_totp("tom")  # TOTP only: no email, no phone
    config = await world.device_config("tom", "laptop", location.location.name)
    client = await world.client_process("client", "connect", "--config", str(config),
                                        "--netns", client_net.netns, "--interface", net.name("t1"))
    menu = await read_until(client, "second factor:")
    assert "totp" in menu and "email" in menu and "mobile" in menu
    client.stdin.write(b"email\n")
    await client.stdin.drain()
    await read_until(client, "email: not set up for you")
    client.stdin.write(b"1\n")
    client.stdin.write(f"{pyotp.TOTP(secret).now()}\n".encode())
    await client.stdin.drain()
    output = await finished(client)
    assert client.returncode == 0 and "connected" in output, output
    world.wgmfa("client", "disconnect", "--interface", net.name("t1"))


async def test_an_app_enrolls_itself_with_its_own_totp_and_opens_a_real_tunnel(world: World) -> None:
    """As Defguard's desktop app: an admin's token, `enrollment/start`, the user's own TOTP
    (the admin never sees the secret), `create_device`, then a method-0 login and traffic."""
    net, stack = world.net, world.stack
    client_net = net.add_client()
    location = await world.location_for_methods()
    open_location = await stack.add_location("apps-open", mfa="disabled", network="10.71.0.0/24", endpoint_port=51825)
    world.gateway(open_location).start()
    await stack.admin.call("user_add", rpc.UserAddRequest(username="nora", email="nora@example.com"), rpc.UserInfo)
    issued = await stack.admin.call("enroll_create", rpc.EnrollCreateRequest(username="nora", reply_key=stack.admin.reply_key.public),
                                    rpc.EnrollCreateResult)
    token = stack.admin.reply_key.open(issued.token_sealed)
    json_only = {"Content-Type": "application/json"}
    async with httpx.AsyncClient(base_url=stack.proxy_url, timeout=15) as http:
        started = await http.post("/api/v1/enrollment/start", content=json.dumps({"token": token}), headers=json_only)
        assert started.status_code == 200, started.text
        assert started.json()["user"]["enrolled"] is False
        cookie = next(c for c in started.headers.get_list("set-cookie") if c.startswith("defguard_proxy="))
        http.cookies.clear()
        with_cookie = json_only | {"Cookie": cookie}
        secret = (await http.post("/api/v1/enrollment/register-mfa/code/start", content=json.dumps({"method": 0}),
                                  headers=with_cookie)).json()["totp_secret"]
        code = pyotp.TOTP(secret).at(utcnow() - timedelta(seconds=30))
        confirmed = await http.post("/api/v1/enrollment/register-mfa/code/finish",
                                    content=json.dumps({"code": code, "method": 0}), headers=with_cookie)
        assert confirmed.status_code == 200, confirmed.text
        private, public = generate_keypair()
        created = await http.post("/api/v1/enrollment/create_device",
                                  content=json.dumps({"name": "nora-laptop", "pubkey": public}), headers=with_cookie)
        assert created.status_code == 200, created.text
    document = created.json()
    chosen = next(c for c in document["configs"] if c["network_id"] == location.location.id)
    assert chosen["location_mfa_mode"] == 2
    config_path = world.work / "nora-laptop.json"
    config_path.write_text(json.dumps(client_config(chosen, document["device"], document["instance"], private,
                                                    document["token"])))
    connected = world.wgmfa("client", "connect", "--config", str(config_path), "--code", pyotp.TOTP(secret).now(),
                            "--proxy-url", stack.proxy_url, "--netns", client_net.netns, "--interface", net.name("n1"))
    assert connected.returncode == 0 and "connected" in connected.stdout, connected.stderr + connected.stdout
    assert net.ping(client_net.netns, "10.69.0.1", count=2)
    world.wgmfa("client", "disconnect", "--interface", net.name("n1"))

    # the location without MFA: the same device connects with no second factor at all
    without = next(c for c in document["configs"] if c["network_id"] == open_location.location.id)
    assert without["location_mfa_mode"] == 1
    open_path = world.work / "nora-laptop-open.json"
    open_path.write_text(json.dumps(client_config(without, document["device"], document["instance"], private,
                                                  document["token"])))
    await eventually(lambda: world.peer_at_gateway(open_location.location.id, public), timeout=20,
                     what="the enrolled device on the gateway of the location without MFA")
    connected = world.wgmfa("client", "connect", "--config", str(open_path), "--netns", client_net.netns,
                            "--interface", net.name("n2"))
    assert connected.returncode == 0 and "connected" in connected.stdout, connected.stderr + connected.stdout
    assert net.ping(client_net.netns, "10.71.0.1", count=2)
    world.wgmfa("client", "disconnect", "--interface", net.name("n2"))


@pytest.mark.timeout(240)
async def test_the_company_login_in_a_real_browser_opens_a_real_tunnel(world: World) -> None:
    from tests.support.browser import log_in_with_chromium
    from tests.support.oidc import Account, Provider, configure

    net, stack = world.net, world.stack
    client_net = net.add_client()
    provider = Provider(f"{stack.proxy_url}/openid/mfa/callback", world.work / "provider.log",
                        {"olaf": Account("olaf@example.com")}).start()
    try:
        await configure(stack.admin, provider.issuer, provider.redirect_uri)
        location = await stack.add_location("sso", mfa="external", network="10.72.0.0/24", endpoint_port=51826)
        world.gateway(location).start()
        await stack.admin.call("user_add", rpc.UserAddRequest(username="olaf", email="olaf@example.com"), rpc.UserInfo)
        config = await world.device_config("olaf", "laptop", "sso")
        client = await world.client_process("client", "connect", "--config", str(config), "--no-browser",
                                            "--netns", client_net.netns, "--interface", net.name("o1"))
        line = await read_until(client, "/openid/mfa?token=")
        url = re.search(r"(http\S+/openid/mfa\?token=\S+)", line).group(1)
        page = await log_in_with_chromium(url, "olaf", world.work)
        assert "VPN login succeeded" in page, page
        output = await finished(client)
        assert client.returncode == 0 and "connected" in output, output
        assert net.ping(client_net.netns, "10.72.0.1", count=2)
        sessions = (await stack.admin.call("sessions", rpc.SessionsRequest(location="sso"), rpc.SessionsResult)).sessions
        assert [(s.username, s.method) for s in sessions] == [("olaf", "oidc")]
        world.wgmfa("client", "disconnect", "--interface", net.name("o1"))
    finally:
        provider.stop()


async def test_a_failed_connect_removes_what_it_brought_up_and_names_stay_per_namespace(world: World) -> None:
    net, stack = world.net, world.stack
    first_net, second_net = net.add_client(), net.add_client()
    # a location whose gateway never comes: no handshake
    await stack.add_location("silent", mfa="disabled", network="10.73.0.0/24", endpoint_port=51829)
    await stack.admin.call("user_add", rpc.UserAddRequest(username="nils", email="nils@example.com"), rpc.UserInfo)
    config_path = await world.device_config("nils", "desktop", "silent")
    name = net.name("f1")
    failed = world.wgmfa("client", "connect", "--config", str(config_path), "--netns", first_net.netns,
                         "--interface", name, "--timeout", "3")
    assert failed.returncode == 4, failed.stderr + failed.stdout
    assert subprocess.run(["ip", "-n", first_net.netns, "link", "show", name], capture_output=True).returncode != 0
    assert not Path(f"/var/run/wireguard/{name}.sock").exists()

    # an interface of that name in one namespace is never taken over from another
    other = UserspaceBackend()
    private, public = generate_keypair()
    await other.ensure_interface(InterfaceConfig(name, private, 0, "10.70.9.1/32", netns=first_net.netns))
    try:
        refused = world.wgmfa("client", "connect", "--config", str(config_path), "--netns", second_net.netns,
                              "--interface", name, "--timeout", "3")
        assert refused.returncode == 3, refused.stderr + refused.stdout
        assert "taken by an interface in another network namespace" in refused.stderr
        assert (await other.status()).public_key == public  # untouched
    finally:
        await other.remove_interface()
    # by default, the name comes from the namespace as well
    names = {interface_name({"location_id": 1}, argparse.Namespace(interface=None, netns=ns))
             for ns in (first_net.netns, second_net.netns)}
    assert len(names) == 2
