"""The gateway against a real bus: resync from the stream, following it, retries, stats."""
from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import datetime, timezone

import pytest
import pytest_asyncio

from events import subjects
from events.bus import Bus
from runtime.testing import FakeClock
from schemas.sealing import generate_keypair, generate_psk, seal
from schemas.signing import PeerSigner
from gateway_worker.app import Gateway
from wireguard.port import PeerConfig
from wireguard.testing import FakeBackend
from gateway_worker.settings import GatewaySettings
from schemas.common import RevokeReason, utcnow, uuid7
from schemas.events import PeerAuthorized, PeerRevoked
from schemas.rpc import GatewayCredentials
from tests.support.stack import eventually, read_stream

LOCATION = 7


SIGNER = PeerSigner(b"c" * 32)  # the core's key in these tests


@dataclass
class Setup:
    bus: Bus
    nats_url: str
    credentials: GatewayCredentials
    sealing_public: str
    backend: FakeBackend
    keys: dict[int, str]

    def pubkey(self, device: int) -> str:
        return self.keys.setdefault(device, generate_keypair()[1])

    def authorize(self, device: int, generation: int = 1, psk: str | None = "fresh") -> tuple[PeerAuthorized, str | None]:
        key = generate_psk() if psk == "fresh" else psk
        state = PeerAuthorized(
            location_id=LOCATION, device_id=device, generation=generation, session_id=device * 10 + generation,
            pubkey=self.pubkey(device), allowed_ips=[f"10.7.0.{device}/32"], keepalive_s=25,
            psk_sealed=seal(self.sealing_public, key) if key else None, authorized_at=utcnow(),
            threshold_s=300 if key else None,
        )
        return SIGNER.sign(state), key

    def revoke(self, device: int, generation: int = 1) -> PeerRevoked:
        return PeerRevoked(location_id=LOCATION, device_id=device, generation=generation, pubkey=self.pubkey(device),
                           reason=RevokeReason.ADMIN)

    async def put(self, state: PeerAuthorized | PeerRevoked) -> None:
        await self.bus.publish(subjects.peer(LOCATION, state.device_id), state)

    def gateway(self, gateway_id: str = "gw1", backend: FakeBackend | None = None, **settings: object) -> Gateway:
        return Gateway(
            GatewaySettings(nats_url=self.nats_url, gateway_id=gateway_id, stats_interval=3600, **settings),
            self.credentials, backend or self.backend, clock=FakeClock(datetime(2026, 5, 1, tzinfo=timezone.utc)),
            bus=self.bus,
        )

    def peer(self, device: int) -> PeerConfig | None:
        status = self.backend.peers.get(self.pubkey(device))
        return status.config() if status else None

    async def events(self, kind: str) -> list[dict]:
        return [e for e in await read_stream(self.bus, subjects.EVENTS_ALL) if e["type"] == kind]


@pytest_asyncio.fixture
async def setup(nats_url: str) -> AsyncIterator[Setup]:
    bus = await Bus.connect(nats_url, "test", wait_s=5)
    await bus.ensure_streams()
    sealing_private, sealing_public = generate_keypair()
    credentials = GatewayCredentials(location_id=LOCATION, location_name="lab", private_key=generate_keypair()[0],
                                     sealing_private_key=sealing_private, listen_port=51820, address="10.7.0.1/24",
                                     network="10.7.0.0/24", mfa_required=False, core_signing_key=SIGNER.public_key)
    yield Setup(bus, nats_url, credentials, sealing_public, FakeBackend(), {})
    await bus.close()


async def test_start_resyncs_by_diff_and_leaves_correct_peers_alone(setup: Setup) -> None:
    a, a_psk = setup.authorize(1)
    b, b_psk = setup.authorize(2)
    c, c_psk = setup.authorize(3, psk=None)  # a location without MFA: no PSK
    for state in (a, b, c, setup.revoke(4)):
        await setup.put(state)
    # what the interface holds from before: 1 correct, 2 with an old PSK, 4 revoked since, 5 unknown
    backend = setup.backend
    from wireguard.port import InterfaceConfig

    await backend.ensure_interface(InterfaceConfig("wgmfa7", setup.credentials.private_key, 51820, "10.7.0.1/24"))
    await backend.set_peer(PeerConfig(setup.pubkey(1), a_psk, ("10.7.0.1/32",)))
    await backend.set_peer(PeerConfig(setup.pubkey(2), generate_psk(), ("10.7.0.2/32",)))
    await backend.set_peer(PeerConfig(setup.pubkey(4), generate_psk(), ("10.7.0.4/32",)))
    await backend.set_peer(PeerConfig(setup.pubkey(5), None, ("10.7.0.5/32",)))
    backend.handshake(setup.pubkey(1), at=1_700_000_000)
    backend.sets.clear()

    gateway = setup.gateway()
    await gateway.start()
    try:
        assert setup.peer(1) == PeerConfig(setup.pubkey(1), a_psk, ("10.7.0.1/32",))
        assert setup.peer(2) == PeerConfig(setup.pubkey(2), b_psk, ("10.7.0.2/32",))
        assert setup.peer(3) == PeerConfig(setup.pubkey(3), None, ("10.7.0.3/32",))
        assert setup.peer(4) is None and setup.peer(5) is None
        assert backend.sets[setup.pubkey(1)] == 0  # untouched: its session lives on
        assert backend.peers[setup.pubkey(1)].latest_handshake == 1_700_000_000
        [synced] = await setup.events("gateway.synced")
        assert (synced["added"], synced["updated"], synced["removed"], synced["unchanged"]) == (1, 1, 2, 1)
    finally:
        await gateway.stop()


async def test_following_the_stream_applies_in_generation_order(setup: Setup) -> None:
    gateway = setup.gateway()
    await gateway.start()
    try:
        first, _ = setup.authorize(1, generation=1)
        second, second_psk = setup.authorize(1, generation=2)
        await setup.put(first)
        await setup.put(second)
        await eventually(lambda: setup.peer(1) and setup.peer(1).preshared_key == second_psk, what="generation 2")
        await setup.put(first)  # a replay of an older generation changes nothing
        await setup.put(setup.revoke(1, generation=1))  # nor does a revoke of the older session
        await asyncio.sleep(1.5)
        assert setup.peer(1).preshared_key == second_psk
        await setup.put(setup.revoke(1, generation=2))
        await eventually(lambda: setup.peer(1) is None, what="the revoke")
    finally:
        await gateway.stop()


class SlowBackend(FakeBackend):
    """Every write to the interface takes a while, so that two states handled together overlap."""

    async def set_peer(self, peer: PeerConfig):  # type: ignore[override]
        await asyncio.sleep(0.05)
        return await super().set_peer(peer)

    async def remove_peer(self, public_key: str) -> None:
        await asyncio.sleep(0.05)
        await super().remove_peer(public_key)


@pytest.mark.parametrize("first", ["authorize", "revoke"])
async def test_an_authorize_and_a_revoke_of_one_generation_handled_together_leave_no_peer(setup: Setup, first: str) -> None:
    setup.backend = SlowBackend()
    gateway = setup.gateway()
    await gateway.start()
    try:
        authorized, _ = setup.authorize(1, generation=3)
        revoked = setup.revoke(1, generation=3)
        states = [authorized, revoked] if first == "authorize" else [revoked, authorized]
        await asyncio.gather(*(gateway.apply(state) for state in states))
        assert setup.peer(1) is None  # the revoke comes after the authorize of its generation
        assert gateway.applied[1].order == (3, 1)
    finally:
        await gateway.stop()


async def test_a_failed_apply_is_reported_and_retried_until_it_holds(setup: Setup) -> None:
    gateway = setup.gateway()
    await gateway.start()
    try:
        setup.backend.fail_next = 2
        state, psk = setup.authorize(1)
        await setup.put(state)
        await eventually(lambda: setup.peer(1) is not None, timeout=15, what="the retried apply")
        assert setup.peer(1).preshared_key == psk
        failures = await setup.events("gateway.apply_failed")
        assert [(f["action"], f["attempt"]) for f in failures] == [("authorize", 1), ("authorize", 2)]
        assert "injected failure" in failures[0]["reason"]
    finally:
        await gateway.stop()


async def test_a_psk_sealed_to_another_key_is_dead_lettered(setup: Setup) -> None:
    gateway = setup.gateway()
    await gateway.start()
    try:
        wrong = SIGNER.sign(setup.authorize(1)[0].model_copy(update={"psk_sealed": seal(generate_keypair()[1], generate_psk())}))
        await setup.put(wrong)
        good, _ = setup.authorize(2)
        await setup.put(good)
        await eventually(lambda: setup.peer(2) is not None, what="the next state")
        assert setup.peer(1) is None
        letters = await eventually(lambda: read_stream(setup.bus, subjects.DLQ_ALL), what="the DLQ copy")
        assert letters[0]["original_subject"] == subjects.peer(LOCATION, 1) and "PSK" in letters[0]["reason"]
    finally:
        await gateway.stop()


async def test_a_restarted_gateway_converges_without_disturbing_valid_peers(setup: Setup) -> None:
    stays, stays_psk = setup.authorize(1)
    goes, _ = setup.authorize(2)
    await setup.put(stays)
    await setup.put(goes)
    gateway = setup.gateway()
    await gateway.start()
    setup.backend.handshake(setup.pubkey(1), at=1_700_000_100)
    await gateway.stop()

    # while it is down, one device is authorized and another revoked
    comes, comes_psk = setup.authorize(3)
    await setup.put(comes)
    await setup.put(setup.revoke(2))
    setup.backend.sets.clear()

    restarted = setup.gateway()
    await restarted.start()
    try:
        assert setup.peer(3) == PeerConfig(setup.pubkey(3), comes_psk, ("10.7.0.3/32",))
        assert setup.peer(2) is None
        assert setup.peer(1).preshared_key == stays_psk
        assert setup.backend.sets[setup.pubkey(1)] == 0
        assert setup.backend.peers[setup.pubkey(1)].latest_handshake == 1_700_000_100
        await asyncio.sleep(1.5)  # the durable consumer's backlog changes nothing more
        assert setup.backend.sets[setup.pubkey(1)] == 0 and setup.backend.sets[setup.pubkey(3)] == 1
    finally:
        await restarted.stop()


async def test_stats_carry_the_gateway_clock_and_split_large_interfaces(setup: Setup) -> None:
    gateway = setup.gateway()
    await gateway.start()
    try:
        for device in range(1, 2502):
            await setup.backend.set_peer(PeerConfig(setup.pubkey(device), None, (f"10.8.{device // 250}.{device % 250}/32",)))
        setup.backend.handshake(setup.pubkey(1), at=1_777_000_000, rx=10, tx=20)
        await gateway.publish_stats()
        samples = await read_stream(setup.bus, subjects.stats(LOCATION, "gw1"))
        assert [(s["part"], s["parts"], len(s["peers"])) for s in samples] == [(1, 3, 1000), (2, 3, 1000), (3, 3, 501)]
        assert len({s["sample_id"] for s in samples}) == 1
        assert {s["sampled_at"] for s in samples} == {"2026-05-01T00:00:00Z"}
        first = next(p for s in samples for p in s["peers"] if p["pubkey"] == setup.pubkey(1))
        assert first["latest_handshake"] == "2026-04-24T03:06:40Z" and (first["rx_bytes"], first["tx_bytes"]) == (10, 20)
    finally:
        await gateway.stop()


async def test_a_lost_interface_is_recreated_and_resynced(setup: Setup) -> None:
    state, psk = setup.authorize(1)
    await setup.put(state)
    gateway = setup.gateway()
    await gateway.start()
    try:
        setup.backend.lost = True  # wireguard-go crashed
        assert await gateway.publish_stats() is None
        assert setup.peer(1) == PeerConfig(setup.pubkey(1), psk, ("10.7.0.1/32",))
        assert len(await setup.events("gateway.synced")) == 2
    finally:
        await gateway.stop()


def forgeries(genuine: PeerAuthorized) -> dict[str, PeerAuthorized]:
    """Authorizations a gateway of an MFA location must refuse, each with what gives it away."""
    unsigned = genuine.model_copy(update={"signature": None, "generation": genuine.generation + 1, "event_id": uuid7()})
    other_key = PeerSigner(b"x" * 32)
    return {
        "unsigned": unsigned,
        "signed with another key": other_key.sign(unsigned),
        "altered after signing": genuine.model_copy(update={"event_id": uuid7(), "allowed_ips": ["10.7.0.0/24"],
                                                            "generation": genuine.generation + 1}),
        "no PSK": SIGNER.sign(unsigned.model_copy(update={"psk_sealed": None})),
        "no threshold": SIGNER.sign(unsigned.model_copy(update={"threshold_s": None})),
        "allowed IPs outside the network": SIGNER.sign(unsigned.model_copy(update={"allowed_ips": ["10.99.0.5/32"]})),
    }


REFUSAL_REASONS = {
    "unsigned": "unsigned",
    "signed with another key": "not the core's",
    "altered after signing": "not the core's",
    "no PSK": "no PSK",
    "no threshold": "threshold",
    "allowed IPs outside the network": "outside the location's network",
}


@pytest.mark.parametrize("forgery", list(REFUSAL_REASONS))
async def test_a_forged_or_unfit_authorization_is_refused_and_the_device_keeps_its_peer(setup: Setup, forgery: str) -> None:
    setup.credentials = setup.credentials.model_copy(update={"mfa_required": True})
    genuine, psk = setup.authorize(1)
    await setup.put(genuine)
    gateway = setup.gateway()
    await gateway.start()
    try:
        assert setup.peer(1) == PeerConfig(setup.pubkey(1), psk, ("10.7.0.1/32",))
        bad = forgeries(genuine)[forgery]
        await setup.put(bad)
        failures = await eventually(lambda: setup.events("gateway.apply_failed"), timeout=10, what="the refusal")
        assert REFUSAL_REASONS[forgery] in failures[0]["reason"] and failures[0]["device_id"] == 1
        letters = await eventually(lambda: read_stream(setup.bus, subjects.DLQ_ALL), what="the DLQ copy")
        assert letters[0]["original_subject"] == subjects.peer(LOCATION, 1)
        assert setup.peer(1) == PeerConfig(setup.pubkey(1), psk, ("10.7.0.1/32",))  # as it was
        # a restart finds the refused state last, the true one gone: it fails closed
        await gateway.stop()
        gateway = setup.gateway()
        await gateway.start()
        assert setup.peer(1) is None
        # and the core's next authorization of the device applies
        newer, newer_psk = setup.authorize(1, generation=genuine.generation + 5)
        await setup.put(newer)
        await eventually(lambda: setup.peer(1) == PeerConfig(setup.pubkey(1), newer_psk, ("10.7.0.1/32",)),
                         timeout=10, what="the next genuine authorization")
    finally:
        await gateway.stop()


async def test_an_unsigned_authorization_for_a_new_key_never_reaches_the_interface(setup: Setup) -> None:
    gateway = setup.gateway()
    await gateway.start()
    try:
        forged, _ = setup.authorize(2)
        await setup.put(forged.model_copy(update={"signature": None, "event_id": uuid7()}))
        await eventually(lambda: setup.events("gateway.apply_failed"), timeout=10, what="the refusal")
        assert setup.peer(2) is None
    finally:
        await gateway.stop()


async def test_a_resync_of_many_peers_touches_only_those_whose_state_changed(setup: Setup) -> None:
    devices = range(1, 201)
    psks = {}
    for device in devices:
        state, psks[device] = setup.authorize(device)
        await setup.put(state)
    gateway = setup.gateway()
    await gateway.start()
    await gateway.stop()
    assert len(setup.backend.peers) == 200
    for device in devices:
        setup.backend.handshake(setup.pubkey(device), at=1_700_000_000 + device)

    # while it is down: 5 devices get new PSKs, 3 are revoked, 2 are new
    changed = [10, 20, 30, 40, 50]
    revoked = [60, 70, 80]
    new = [201, 202]
    for device in changed:
        state, psks[device] = setup.authorize(device, generation=2)
        await setup.put(state)
    for device in revoked:
        await setup.put(setup.revoke(device, generation=2))
    for device in new:
        state, psks[device] = setup.authorize(device)
        await setup.put(state)
    setup.backend.sets.clear()
    setup.backend.removes.clear()

    restarted = setup.gateway()
    await restarted.start()
    try:
        healthy = [d for d in devices if d not in changed and d not in revoked]
        assert [d for d in healthy if setup.backend.sets[setup.pubkey(d)]] == []  # no healthy peer written
        assert all(setup.backend.peers[setup.pubkey(d)].latest_handshake == 1_700_000_000 + d for d in healthy)
        assert sorted(d for d in (*devices, *new) if setup.backend.sets[setup.pubkey(d)]) == sorted(changed + new)
        assert sorted(d for d in devices if setup.backend.removes[setup.pubkey(d)]) == revoked
        assert all(setup.peer(d).preshared_key == psks[d] for d in healthy + changed + new)  # type: ignore[union-attr]
        synced = (await setup.events("gateway.synced"))[-1]
        assert (synced["added"], synced["updated"], synced["removed"], synced["unchanged"]) == (2, 5, 3, 192)
    finally:
        await restarted.stop()


async def test_a_resync_checks_again_only_the_authorizations_it_has_not_seen(
    setup: Setup, monkeypatch: pytest.MonkeyPatch
) -> None:
    from gateway_worker import app as gateway_app

    checked: list[int] = []
    verify = gateway_app.signing.verify

    def counting_verify(state: PeerAuthorized, key: str) -> None:
        checked.append(state.device_id)
        verify(state, key)

    monkeypatch.setattr(gateway_app.signing, "verify", counting_verify)
    setup.credentials = setup.credentials.model_copy(update={"mfa_required": True})
    states = {}
    for device in (1, 2, 3):
        states[device], _ = setup.authorize(device)
        await setup.put(states[device])
    gateway = setup.gateway()
    await gateway.start()
    try:
        assert sorted(checked) == [1, 2, 3]
        newer, newer_psk = setup.authorize(2, generation=2)
        await setup.put(newer)
        await eventually(lambda: setup.peer(2) == PeerConfig(setup.pubkey(2), newer_psk, ("10.7.0.2/32",)),
                         timeout=10, what="the newer authorization")
        checked.clear()
        await gateway.resync()
        assert checked == []  # nothing it had not accepted already
        # a message that keeps the signature and generation of an accepted one but not its
        # content is checked again, refused, and the resync fails closed for that device
        tampered = states[3].model_copy(update={"allowed_ips": ["10.7.0.99/32"], "event_id": uuid7()})
        await setup.put(tampered)
        await gateway.resync()
        assert set(checked) == {3}  # (its stream consumer may meet it too, and refuse it as well)
        assert setup.peer(3) is None and setup.peer(1) is not None
    finally:
        await gateway.stop()
