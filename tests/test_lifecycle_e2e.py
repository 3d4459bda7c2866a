"""Admin changes on real tunnels: network namespaces, wireguard-go, every service a real
process, the operator's commands through the CLI. Root only."""
from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator

import pyotp
import pytest
import pytest_asyncio
from nats.js.api import StreamConfig

from events import nats_direct
from events import streams
from events.bus import Bus
from wireguard.port import InterfaceConfig
from wireguard.userspace import UserspaceBackend
from schemas import rpc
from tests.support.netns import Topology, sh
from tests.support.stack import ServiceProcess, eventually
from tests.test_tunnel_e2e import World, running_world

pytestmark = [pytest.mark.root, pytest.mark.asyncio(loop_scope="module")]

CUT_WITHIN_S = 2.0


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def world(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[World]:
    async with running_world(tmp_path_factory.mktemp("lifecycle")) as w:
        yield w


async def connected_device(world: World, username: str, device: str, location: rpc.LocationAddResult,
                           secret: str | None) -> tuple[dict, str, str]:
    """A device of the user with a live tunnel: (config, client netns, client interface)."""
    net = world.net
    client = net.add_client()
    path = await world.device_config(username, device, location.location.name)
    interface = net.name(f"c{client.index}")
    args = ["client", "connect", "--config", str(path), "--netns", client.netns, "--interface", interface]
    if secret is not None:
        args += ["--code", pyotp.TOTP(secret).now()]
    result = await asyncio.to_thread(world.wgmfa, *args)
    assert result.returncode == 0, result.stderr + result.stdout
    gateway_ip = location.location.gateway_address.split("/")[0]
    assert net.ping(client.netns, gateway_ip, count=2)
    return json.loads(path.read_text()) | {"path": str(path)}, client.netns, interface


async def admin_cli(world: World, *args: str) -> float:
    """Run `wgmfa admin --actor …`, as an operator does; returns when it returned (its
    answer comes once the change is committed and published)."""
    began = time.monotonic()
    result = await asyncio.to_thread(world.wgmfa, "admin", "--actor", "ops-test", *args)
    assert result.returncode == 0, result.stderr + result.stdout
    print(f"`wgmfa admin {' '.join(args)}` took {time.monotonic() - began:.2f} s")
    return time.monotonic()


async def assert_cut(world: World, location: rpc.LocationAddResult, config: dict, netns: str, since: float,
                     interfaces: list[UserspaceBackend] | None = None) -> None:
    """The peer is gone from the gateway(s) and the tunnel carries nothing, within 2 s."""
    targets = interfaces or [world.interface(location.location.id)]

    async def gone() -> bool:
        for backend in targets:
            peers = (await backend.status()).peers
            if any(p.public_key == config["pubkey"] for p in peers):
                return False
        return True

    await eventually(gone, timeout=CUT_WITHIN_S + 3, interval=0.05, what="the peer to leave the gateway")
    elapsed = time.monotonic() - since
    print(f"peer gone from {len(targets)} gateway(s) {elapsed:.2f} s after the command returned")
    assert elapsed <= CUT_WITHIN_S, f"the peer left {elapsed:.2f} s after the command"
    assert not world.net.ping(netns, location.location.gateway_address.split("/")[0], wait_s=1)


async def start_login(world: World, location_id: int, pubkey: str) -> tuple[int, dict]:
    response = await world.stack.http.post(
        "/api/v1/client-mfa/start", json={"location_id": location_id, "pubkey": pubkey, "method": 0}
    )
    return response.status_code, response.json()


async def test_disabling_a_user_cuts_the_tunnel_and_refuses_the_next_login(world: World) -> None:
    location = await world.stack.add_location("disable", network="10.70.0.0/24", endpoint_port=51830)
    world.gateway(location).start()
    secret = await world.stack.add_user_with_totp("dora")
    config, netns, interface = await connected_device(world, "dora", "laptop", location, secret)

    since = await admin_cli(world, "user", "disable", "dora")
    await assert_cut(world, location, config, netns, since)
    assert await start_login(world, location.location.id, config["pubkey"]) == (401, {"error": "unauthorized"})
    events = await world.stack.admin.call("sessions", rpc.SessionsRequest(location="disable"), rpc.SessionsResult)
    assert [(s.state.value, s.revoke_reason) for s in events.sessions] == [("revoked", "user_disabled")]

    await admin_cli(world, "user", "enable", "dora")
    status, body = await start_login(world, location.location.id, config["pubkey"])
    assert status == 200 and body["token"]  # MFA again before any tunnel
    world.wgmfa("client", "disconnect", "--interface", interface)


async def test_removing_a_device_cuts_its_tunnel(world: World) -> None:
    location = await world.stack.add_location("remove", network="10.71.0.0/24", endpoint_port=51831)
    world.gateway(location).start()
    secret = await world.stack.add_user_with_totp("remy")
    config, netns, interface = await connected_device(world, "remy", "laptop", location, secret)

    since = await admin_cli(world, "device", "remove", "remy", "laptop")
    await assert_cut(world, location, config, netns, since)
    assert await start_login(world, location.location.id, config["pubkey"]) == (400, {"error": "device not found"})
    world.wgmfa("client", "disconnect", "--interface", interface)


async def test_deleting_a_user_cuts_the_tunnel(world: World) -> None:
    location = await world.stack.add_location("delete", network="10.72.0.0/24", endpoint_port=51832)
    world.gateway(location).start()
    secret = await world.stack.add_user_with_totp("dale")
    config, netns, interface = await connected_device(world, "dale", "laptop", location, secret)

    since = await admin_cli(world, "user", "delete", "dale")
    await assert_cut(world, location, config, netns, since)
    assert await start_login(world, location.location.id, config["pubkey"]) == (400, {"error": "device not found"})
    world.wgmfa("client", "disconnect", "--interface", interface)


async def test_removing_a_location_cuts_its_tunnels(world: World) -> None:
    location = await world.stack.add_location("closing", network="10.73.0.0/24", endpoint_port=51833)
    world.gateway(location).start()
    secret = await world.stack.add_user_with_totp("cleo")
    config, netns, interface = await connected_device(world, "cleo", "laptop", location, secret)

    since = await admin_cli(world, "location", "remove", "closing")
    await assert_cut(world, location, config, netns, since)
    assert await start_login(world, location.location.id, config["pubkey"]) == (400, {"error": "location not found"})
    world.wgmfa("client", "disconnect", "--interface", interface)


async def test_a_mode_change_converges_on_two_gateways_both_ways(world: World) -> None:
    """Two gateways of one location (the second in a namespace of its own); the client's
    tunnel goes through the first."""
    location = await world.stack.add_location("modes", mfa="disabled", network="10.74.0.0/24", endpoint_port=51834)
    world.gateway(location).start()
    with Topology() as other:
        credentials = world.work / f"gateway-{location.location.id}.json"
        world.stack.allow_gateway(location.location.id, "gw2")  # its own NATS role
        second = ServiceProcess(
            "gateway_worker", world.stack.env, world.work / "gateway-modes-gw2.log",
            args=["--credentials", str(credentials), "--netns", other.gateway, "--gateway-id", "gw2",
                  "--interface", other.name("g2")],
        )
        second.start()
        try:
            gateways = [world.interface(location.location.id), UserspaceBackend()]
            gateways[1].config = InterfaceConfig(other.name("g2"), "", 0, "", netns=other.gateway)
            await world.stack.admin.call("user_add", rpc.UserAddRequest(username="mo", email="mo@example.com"), rpc.UserInfo)
            config, netns, interface = await connected_device(world, "mo", "desktop", location, None)

            async def on_both(with_psk: bool | None) -> bool:
                for backend in gateways:
                    try:
                        peer = next((p for p in (await backend.status()).peers if p.public_key == config["pubkey"]), None)
                    except Exception:
                        return False
                    if (peer is None) != (with_psk is None):
                        return False
                    if peer is not None and (peer.preshared_key is not None) != with_psk:
                        return False
                return True

            await eventually(lambda: on_both(False), timeout=20, what="the peer without PSK on both gateways")

            # no MFA -> MFA: the unauthenticated peer leaves both gateways; the next login needs MFA
            since = await admin_cli(world, "location", "set", "modes", "--mfa", "internal")
            await assert_cut(world, location, config, netns, since, gateways)
            status, body = await start_login(world, location.location.id, config["pubkey"])
            assert (status, body) == (400, {"error": "selected MFA method not available"})  # MFA, and mo has none yet

            # MFA -> none: the device is back on both gateways without PSK, and the tunnel carries again
            await admin_cli(world, "location", "set", "modes", "--mfa", "disabled")
            await eventually(lambda: on_both(False), timeout=CUT_WITHIN_S + 3, what="the peer back on both gateways")
            again = await asyncio.to_thread(
                world.wgmfa, "client", "connect", "--config", config["path"], "--netns", netns, "--interface", interface
            )
            assert again.returncode == 0, again.stderr + again.stdout
            assert world.net.ping(netns, "10.74.0.1", count=2)
            events = [e for e in await world.stack.read("wgmfa.events.admin.>") if e["type"] == "admin.location_changed"]
            assert [(e["actor"], e["changes"]["mfa_mode"]) for e in events] == [
                ("ops-test", {"old": "disabled", "new": "internal"}), ("ops-test", {"old": "internal", "new": "disabled"}),
            ]
            world.wgmfa("client", "disconnect", "--interface", interface)
        finally:
            second.stop()


async def test_sessions_live_shows_the_handshake_and_endpoint_of_a_real_tunnel(world: World) -> None:
    location = await world.stack.add_location("live", network="10.75.0.0/24", endpoint_port=51835)
    world.gateway(location).start()
    secret = await world.stack.add_user_with_totp("liv")
    config, netns, interface = await connected_device(world, "liv", "laptop", location, secret)
    client_address = next(c.address for c in world.net.clients if c.netns == netns)

    async def shown() -> list[dict]:
        result = await asyncio.to_thread(world.wgmfa, "admin", "sessions", "--live", "--location", "live", "--json")
        sessions = json.loads(result.stdout)
        return sessions if sessions and sessions[0]["handshake_age_s"] is not None else []

    session = (await eventually(shown, timeout=20, interval=0.5, what="the tunnel's sample in sessions --live"))[0]
    assert session["endpoint"].startswith(f"{client_address}:")
    assert 0 <= session["handshake_age_s"] < 30 and session["rx_bytes"] > 0 and session["tx_bytes"] > 0
    assert session["gateway_id"] == "gw1" and session["state"] == "connected"
    table = world.wgmfa("admin", "sessions", "--live", "--location", "live")
    assert client_address in table.stdout and " ago" in table.stdout, table.stdout
    world.wgmfa("client", "disconnect", "--interface", interface)


async def test_a_core_killed_before_publishing_a_disable_revokes_after_restart(world: World) -> None:
    """The disable is committed, its publish fails (the peer stream does not take the
    subject for a moment), and the core is killed: the next core publishes it."""
    stack = world.stack
    location = await stack.add_location("crash", network="10.76.0.0/24", endpoint_port=51836)
    world.gateway(location).start()
    secret = await stack.add_user_with_totp("cody")
    config, netns, interface = await connected_device(world, "cody", "laptop", location, secret)

    bus = await Bus.connect(stack.nats_url, "test-operator-of-nats", wait_s=5)  # no role may change a stream
    info = await nats_direct.jetstream(bus.broker, 5).stream_info(streams.PEERS.name)
    original = info.config
    paused = StreamConfig.from_response(original.as_dict())
    paused.subjects = ["wgmfa.peer-paused.>"]
    await nats_direct.jetstream(bus.broker, 5).update_stream(paused)
    try:
        await admin_cli(world, "user", "disable", "cody")
        stack.core.process.kill()  # SIGKILL: no shutdown, no flush
        stack.core.process.wait()
    finally:
        await nats_direct.jetstream(bus.broker, 5).update_stream(original)
        await bus.close()
    await asyncio.sleep(1)
    assert await world.peer_at_gateway(location.location.id, config["pubkey"]) is not None  # never published
    assert world.net.ping(netns, "10.76.0.1")

    stack.core.start()
    await stack.wait_core()
    await eventually(lambda: _gone(world, location.location.id, config["pubkey"]), timeout=20,
                     what="the restarted core to publish the revoke")
    assert not world.net.ping(netns, "10.76.0.1", wait_s=1)
    world.wgmfa("client", "disconnect", "--interface", interface)


async def _gone(world: World, location_id: int, pubkey: str) -> bool:
    return await world.peer_at_gateway(location_id, pubkey) is None


async def test_routed_networks_are_reachable_through_the_gateway(world: World) -> None:
    """`--allowed-ips` lets clients reach a company network behind the gateway: the gateway
    forwards for its interface; the operator gives the company network a way back."""
    net = world.net
    company, outer, inner = f"wgt{net.tag}r", f"vr{net.tag}a", f"vr{net.tag}b"
    sh("ip", "netns", "add", company)
    try:
        sh("ip", "link", "add", outer, "type", "veth", "peer", "name", inner)
        sh("ip", "link", "set", outer, "netns", net.gateway)
        sh("ip", "link", "set", inner, "netns", company)
        net.run(net.gateway, "ip", "address", "add", "192.168.77.1/24", "dev", outer)
        net.run(net.gateway, "ip", "link", "set", outer, "up")
        net.run(company, "ip", "link", "set", "lo", "up")
        net.run(company, "ip", "address", "add", "192.168.77.2/24", "dev", inner)
        net.run(company, "ip", "link", "set", inner, "up")
        # the operator's part: the way back to the VPN network, and forwarding on the LAN side
        net.run(company, "ip", "route", "add", "10.77.0.0/24", "via", "192.168.77.1")
        net.run(net.gateway, "sysctl", "-q", "-w", f"net.ipv4.conf.{outer}.forwarding=1")

        location = await world.stack.add_location("routed", network="10.77.0.0/24", endpoint_port=51837)
        await admin_cli(world, "location", "set", "routed", "--allowed-ips", "192.168.77.0/24", "--dns", "192.168.77.2")
        world.gateway(location).start()
        secret = await world.stack.add_user_with_totp("rob")
        config, netns, interface = await connected_device(world, "rob", "laptop", location, secret)
        assert config["allowed_ips"] == ["10.77.0.0/24", "192.168.77.0/24"]
        gateway_if = net.name(f"g{location.location.id}")
        forwarding = net.run(net.gateway, "sysctl", "-n", f"net.ipv4.conf.{gateway_if}.forwarding").stdout.strip()
        assert forwarding == "1"
        assert net.ping(netns, "192.168.77.2", count=2)
        # it is the gateway's forwarding that carries it
        net.run(net.gateway, "sysctl", "-q", "-w", f"net.ipv4.conf.{gateway_if}.forwarding=0")
        assert not net.ping(netns, "192.168.77.2", wait_s=1)
        world.wgmfa("client", "disconnect", "--interface", interface)
    finally:
        sh("ip", "netns", "delete", company, check=False)
