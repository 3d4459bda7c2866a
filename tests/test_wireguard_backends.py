"""The WireGuardBackend port: one contract for the fake and the real adapters, and real
tunnels between network namespaces."""
from __future__ import annotations

import base64
import os
import time
from collections.abc import AsyncIterator

import pytest
import pytest_asyncio

from schemas.sealing import generate_keypair, generate_psk
from wireguard.port import BackendError, BackendUnavailable, InterfaceConfig, PeerConfig
from wireguard.testing import FakeBackend
from wireguard.kernel import KernelBackend
from wireguard.userspace import UserspaceBackend
from tests.support.netns import GATEWAY_ADDRESS, Topology
from tests.support.stack import eventually


@pytest_asyncio.fixture(
    params=["fake", pytest.param("userspace", marks=pytest.mark.root), pytest.param("kernel", marks=pytest.mark.root)]
)
async def backend(request: pytest.FixtureRequest) -> AsyncIterator[FakeBackend | UserspaceBackend | KernelBackend]:
    private, _ = generate_keypair()
    if request.param == "fake":
        fake = FakeBackend()
        await fake.ensure_interface(InterfaceConfig("wgfake0", private, 51820, "10.99.0.1/24"))
        yield fake
        return
    if request.param == "kernel" and not os.path.exists("/sys/module/wireguard"):
        pytest.skip("kernel WireGuard is not available here: the wireguard module is not loaded")
    with Topology() as topology:
        real = UserspaceBackend() if request.param == "userspace" else KernelBackend()
        await real.ensure_interface(InterfaceConfig(topology.name("gw"), private, 51820, "10.99.0.1/24", netns=topology.gateway))
        yield real
        await real.remove_interface()


class TestContract:
    async def test_a_peer_reads_back_as_set(self, backend) -> None:  # type: ignore[no-untyped-def]
        public = generate_keypair()[1]
        psk = generate_psk()
        applied = await backend.set_peer(PeerConfig(public, psk, ("10.99.0.2/32",)))
        assert (applied.public_key, applied.preshared_key, applied.allowed_ips) == (public, psk, ("10.99.0.2/32",))
        assert applied.latest_handshake == 0  # never
        [peer] = (await backend.status()).peers
        assert peer == applied

    async def test_changing_a_peer_replaces_its_psk_and_allowed_ips(self, backend) -> None:  # type: ignore[no-untyped-def]
        public = generate_keypair()[1]
        await backend.set_peer(PeerConfig(public, generate_psk(), ("10.99.0.2/32",)))
        updated = await backend.set_peer(PeerConfig(public, None, ("10.99.0.3/32", "10.98.0.0/24")))
        assert updated.preshared_key is None
        assert set(updated.allowed_ips) == {"10.99.0.3/32", "10.98.0.0/24"}
        assert len((await backend.status()).peers) == 1

    async def test_a_bad_key_is_refused_before_anything_changes(self, backend) -> None:  # type: ignore[no-untyped-def]
        public = generate_keypair()[1]
        before = await backend.set_peer(PeerConfig(public, generate_psk(), ("10.99.0.2/32",)))
        for bad in ("c2hvcnQ=", "not base64!", base64.b64encode(os.urandom(31)).decode()):  # 31 bytes, 44 characters
            with pytest.raises(BackendError) as caught:
                await backend.set_peer(PeerConfig(public, bad, ("10.99.0.9/32",)))
            assert bad not in str(caught.value)
        with pytest.raises(BackendError):
            await backend.set_peer(PeerConfig("nonsense", None, ("10.99.0.9/32",)))
        assert (await backend.status()).peers == [before]

    async def test_removing_is_idempotent(self, backend) -> None:  # type: ignore[no-untyped-def]
        public = generate_keypair()[1]
        await backend.set_peer(PeerConfig(public, None, ("10.99.0.2/32",)))
        await backend.remove_peer(public)
        await backend.remove_peer(public)
        assert (await backend.status()).peers == []

    async def test_a_batch_applies_everything_or_refuses_before_starting(self, backend) -> None:  # type: ignore[no-untyped-def]
        keep, drop = generate_keypair()[1], generate_keypair()[1]
        await backend.apply([PeerConfig(keep, None, ("10.99.0.2/32",)), PeerConfig(drop, None, ("10.99.0.3/32",))], [])
        fresh = [PeerConfig(generate_keypair()[1], generate_psk(), (f"10.99.1.{i}/32",)) for i in range(1, 50)]
        await backend.apply(fresh, [drop])
        keys = {p.public_key for p in (await backend.status()).peers}
        assert keys == {keep} | {p.public_key for p in fresh}
        with pytest.raises(BackendError):
            await backend.apply([PeerConfig(generate_keypair()[1], None, ("10.99.2.1/32",)), PeerConfig(keep, "bad", ())], [])
        assert {p.public_key for p in (await backend.status()).peers} == keys

    async def test_the_interface_reports_its_key_and_port(self, backend) -> None:  # type: ignore[no-untyped-def]
        status = await backend.status()
        assert status.listen_port == 51820 and len(status.public_key) == 44


@pytest.mark.root
async def test_a_real_tunnel_needs_the_right_psk_and_ends_with_the_peer() -> None:
    with Topology() as net:
        client_net, intruder_net = net.add_client(), net.add_client()
        gw_private, gw_public = generate_keypair()
        gateway = UserspaceBackend()
        await gateway.ensure_interface(InterfaceConfig(net.name("gw"), gw_private, 51820, "10.99.0.1/24", netns=net.gateway))
        psk = generate_psk()

        async def client(netns: str, role: str, address: str, key: str | None) -> tuple[UserspaceBackend, str]:
            private, public = generate_keypair()
            backend = UserspaceBackend()
            await backend.ensure_interface(InterfaceConfig(net.name(role), private, 0, f"{address}/24", netns=netns))
            await backend.set_peer(PeerConfig(gw_public, key, ("10.99.0.0/24",), 1, f"{GATEWAY_ADDRESS}:51820"))
            return backend, public

        alice, alice_public = await client(client_net.netns, "c1", "10.99.0.2", psk)
        intruder, intruder_public = await client(intruder_net.netns, "c2", "10.99.0.3", generate_psk())
        await gateway.set_peer(PeerConfig(alice_public, psk, ("10.99.0.2/32",)))
        await gateway.set_peer(PeerConfig(intruder_public, psk, ("10.99.0.3/32",)))  # it holds another PSK

        async def handshaken(backend: UserspaceBackend, public: str | None = None) -> bool:
            peers = (await backend.status()).peers
            return any(p.latest_handshake > 0 and (public is None or p.public_key == public) for p in peers)

        await eventually(lambda: handshaken(gateway, alice_public), timeout=25, interval=0.3, what="a handshake")
        assert net.ping(client_net.netns, "10.99.0.1", count=2)
        [alice_at_gateway] = [p for p in (await gateway.status()).peers if p.public_key == alice_public]
        assert alice_at_gateway.rx_bytes > 0 and alice_at_gateway.tx_bytes > 0
        assert abs(alice_at_gateway.latest_handshake - time.time()) < 60
        assert alice_at_gateway.endpoint == f"{client_net.address}:" + alice_at_gateway.endpoint.split(":")[1]

        assert not net.ping(intruder_net.netns, "10.99.0.1", wait_s=2)
        assert not await handshaken(gateway, intruder_public)

        await gateway.remove_peer(alice_public)
        assert not net.ping(client_net.netns, "10.99.0.1", wait_s=2)
        for backend in (gateway, alice, intruder):
            await backend.remove_interface()


@pytest.mark.root
async def test_a_dead_wireguard_go_is_reported_and_recreated() -> None:
    with Topology() as net:
        private, _ = generate_keypair()
        config = InterfaceConfig(net.name("gw"), private, 51820, "10.99.0.1/24", netns=net.gateway)
        backend = UserspaceBackend()
        await backend.ensure_interface(config)
        await backend.set_peer(PeerConfig(generate_keypair()[1], None, ("10.99.0.2/32",)))
        net.run(net.gateway, "ip", "link", "delete", config.name)  # wireguard-go goes with it
        await eventually(lambda: not backend.socket_path.exists(), what="wireguard-go to exit")
        with pytest.raises(BackendError, match="gone"):
            await backend.status()
        await backend.ensure_interface(config)
        assert (await backend.status()).peers == []
        await backend.remove_interface()


async def test_kernel_backend_says_why_it_cannot_run_here() -> None:
    if os.path.exists("/sys/module/wireguard"):
        pytest.skip("the wireguard module is loaded here")
    backend = KernelBackend()
    with pytest.raises((BackendUnavailable, BackendError)) as caught:
        await backend.ensure_interface(InterfaceConfig("wgmfak0", generate_keypair()[0], 51820, "10.99.0.1/24"))
    if os.geteuid() == 0:
        assert "wireguard module" in str(caught.value)
