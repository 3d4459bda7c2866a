"""The reaper against a real bus, with a fake clock for its own time."""
from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone

import pytest_asyncio

from events import nats_direct
from events.peer_log import PeerLog
from events import subjects
from events.bus import Bus
from runtime.testing import FakeClock
from schemas.sealing import generate_keypair
from reaper_worker.app import Reaper, ReaperSettings
from reaper_worker.liveness import Liveness
from schemas.common import RevokeReason, uuid7
from schemas.events import PeerAuthorized, PeerRevoked, PeerSample, StatsSample
from tests.conftest import running_nats
from tests.support.stack import ServiceProcess, eventually, read_stream, service_env

THRESHOLD = 300
GATEWAY_CLOCK_SKEW = timedelta(minutes=-7)  # gateways' clocks need not agree with anyone's


@dataclass
class World:
    bus: Bus
    clock: FakeClock
    reaper: Reaper
    gateway_now: datetime

    async def authorize(self, device_id: int, *, generation: int = 1, threshold: int = THRESHOLD,
                        lifetime_s: int = 43200, location_id: int = 1) -> PeerAuthorized:
        now = datetime.now(timezone.utc)
        state = PeerAuthorized(
            location_id=location_id, device_id=device_id, generation=generation, session_id=device_id * 100 + generation,
            pubkey=pubkey(device_id), allowed_ips=[f"10.0.0.{device_id}/32"], keepalive_s=25, psk_sealed=None,
            authorized_at=now, expires_at=now + timedelta(seconds=lifetime_s), threshold_s=threshold,
        )
        assert await PeerLog(self.bus).publish_peer_state(state)
        await eventually(lambda: self._seen(state), what="the reaper to see the authorization")
        return state

    def _seen(self, state: PeerAuthorized) -> bool:
        auth = self.reaper.liveness.authorizations.get((state.location_id, state.device_id))
        return auth is not None and auth.state.generation == state.generation

    async def sample(self, gateway: str, handshakes: dict[int, float | None], location_id: int = 1) -> None:
        """A gateway reports; `handshakes` maps device -> seconds since its last handshake."""
        peers = [
            PeerSample(
                pubkey=pubkey(device),
                latest_handshake=None if age is None else self.gateway_now - timedelta(seconds=age),
                rx_bytes=1000, tx_bytes=1000,
            )
            for device, age in handshakes.items()
        ]
        sample = StatsSample(location_id=location_id, gateway_id=gateway, sample_id=uuid7(),
                             sampled_at=self.gateway_now, peers=peers)
        count = len(self.reaper.liveness.handshakes)
        await self.bus.publish(subjects.stats(location_id, gateway), sample)
        await asyncio.sleep(0.05)
        if any(age is not None for age in handshakes.values()):
            await eventually(lambda: self.reaper.liveness.handshakes or count, what="the sample")

    def advance(self, seconds: float) -> None:
        self.clock.advance(seconds)
        self.gateway_now += timedelta(seconds=seconds)

    async def sweep(self) -> list[tuple[int, str]]:
        before = len(self.reaper.revoked)
        await self.reaper.sweep()
        return [(r.device_id, r.reason.value) for r in self.reaper.revoked[before:]]

    async def last_state(self, device_id: int, location_id: int = 1) -> PeerAuthorized | PeerRevoked:
        record = await PeerLog(self.bus).last_peer_state(location_id, device_id)
        assert record is not None
        return record.state


_keys: dict[int, str] = {}


def pubkey(device: int) -> str:
    return _keys.setdefault(device, generate_keypair()[1])


@pytest_asyncio.fixture
async def world(nats_url: str) -> AsyncIterator[World]:
    bus = await Bus.connect(nats_url, "test", wait_s=5)
    await bus.ensure_streams()  # the core's job; the reaper waits for them
    clock = FakeClock()
    reaper = Reaper(ReaperSettings(nats_url=nats_url, sweep_interval_s=3600), clock=clock, bus=bus)
    await reaper.start()
    yield World(bus, clock, reaper, datetime.now(timezone.utc) + GATEWAY_CLOCK_SKEW)
    await reaper.stop()
    await bus.close()


async def test_a_healthy_peer_with_keepalive_survives_rekeys_at_the_default_threshold(world: World) -> None:
    await world.authorize(1)
    last_handshake = 0.0
    for second in range(0, 900, 10):  # 15 minutes: five or more rekeys
        if second % 150 == 0:  # WireGuard rekeys every 120-180 s while traffic flows
            last_handshake = second
        if second % 30 == 0:  # the gateway samples every 30 s
            await world.sample("gw-a", {1: second - last_handshake})
        assert await world.sweep() == [], f"revoked at {second} s"
        world.advance(10)


async def test_never_connected_is_revoked_one_threshold_after_authorization(world: World) -> None:
    await world.authorize(1)
    await world.sample("gw-a", {1: None})
    world.advance(THRESHOLD - 5)
    assert await world.sweep() == []
    world.advance(10)
    assert await world.sweep() == [(1, "never_connected")]
    state = await world.last_state(1)
    assert isinstance(state, PeerRevoked) and (state.generation, state.reason) == (1, RevokeReason.NEVER_CONNECTED)
    assert await world.sweep() == []  # once


async def test_an_idle_peer_is_revoked_when_its_handshake_is_older_than_the_threshold(world: World) -> None:
    await world.authorize(1)
    world.advance(20)
    await world.sample("gw-a", {1: 5})  # handshook 5 s ago, then silence
    world.advance(THRESHOLD - 10)
    await world.sample("gw-a", {1: THRESHOLD - 5})
    assert await world.sweep() == []
    world.advance(10)
    assert await world.sweep() == [(1, "idle")]


async def test_lifetime_ends_a_busy_session(world: World) -> None:
    await world.authorize(1, lifetime_s=600)
    for _ in range(0, 570, 30):  # 19 rounds: 570 s
        await world.sample("gw-a", {1: 1})
        world.advance(30)
        assert await world.sweep() == []
    world.advance(30)
    await world.sample("gw-a", {1: 1})
    assert await world.sweep() == [(1, "lifetime")]


async def test_the_freshest_handshake_across_gateways_counts(world: World) -> None:
    await world.authorize(1)
    for _ in range(20):  # 10 minutes
        await world.sample("gw-a", {1: 5})  # the gateway the client uses
        await world.sample("gw-b", {1: None})  # the other one never saw it
        world.advance(30)
        assert await world.sweep() == []


async def test_a_stale_revoke_never_overwrites_a_newer_authorization(world: World) -> None:
    await world.authorize(1, generation=1)
    watched = world.reaper.liveness.authorizations[(1, 1)]
    # generation 2 lands while the reaper still holds generation 1 (its consumer is behind)
    newer = PeerAuthorized(**{**watched.state.model_dump(), "event_id": uuid7(), "generation": 2})
    await world.bus.publish(subjects.peer(1, 1), newer)
    world.reaper.liveness.authorizations[(1, 1)] = watched  # as if not yet delivered
    world.advance(THRESHOLD + 20)
    assert await world.sweep() == []  # the revoke of generation 1 was refused by NATS
    assert watched.revoked  # known to be superseded (wrong last sequence), so not retried at every sweep
    state = await world.last_state(1)
    assert isinstance(state, PeerAuthorized) and state.generation == 2


async def test_several_reapers_revoke_a_peer_exactly_once(world: World, nats_url: str) -> None:
    second = Reaper(ReaperSettings(nats_url=nats_url, sweep_interval_s=3600), clock=world.clock, bus=world.bus)
    await second.start()
    try:
        await world.authorize(1)
        await eventually(lambda: (1, 1) in second.liveness.authorizations, what="the second reaper")
        world.advance(THRESHOLD + 20)
        results = await asyncio.gather(world.reaper.sweep(), second.sweep())
        assert sorted(results) == [0, 1]
        stored = await nats_direct.jetstream(world.bus.broker, 5).stream_info("WGMFA_PEERS")
        assert stored.state.last_seq == 2  # the authorization and one revoke
    finally:
        await second.stop()


async def test_a_restarted_reaper_revokes_what_is_due_and_nothing_else(world: World, nats_url: str) -> None:
    # device 1 never connects and has a short threshold; device 2 is busy with a long one
    await world.authorize(1, threshold=3)
    await world.authorize(2, threshold=60)
    gateway_now = datetime.now(timezone.utc)
    sample = StatsSample(location_id=1, gateway_id="gw-a", sample_id=uuid7(), sampled_at=gateway_now,
                         peers=[PeerSample(pubkey=pubkey(2), latest_handshake=gateway_now, rx_bytes=1, tx_bytes=1)])
    await world.bus.publish(subjects.stats(1, "gw-a"), sample)
    await world.reaper.stop()  # the reaper goes away before its sweep, and nothing is published meanwhile
    await asyncio.sleep(3.5)

    restarted = Reaper(ReaperSettings(nats_url=nats_url, sweep_interval_s=3600), clock=FakeClock(), bus=world.bus)
    await restarted.start()
    try:
        await restarted.sweep()  # at once, well inside its first stats interval
        assert [(r.device_id, r.reason.value) for r in restarted.revoked] == [(1, "never_connected")]
        restarted.clock.advance(50)  # device 2 stays until its own threshold
        assert await restarted.sweep() == 0
    finally:
        await restarted.stop()


def test_non_mfa_peers_are_never_watched() -> None:
    liveness = Liveness()
    now = datetime.now(timezone.utc)
    liveness.on_peer_state(
        PeerAuthorized(location_id=1, device_id=1, generation=1, pubkey="k", allowed_ips=[], keepalive_s=25,
                       authorized_at=now, threshold_s=None),
        sequence=1, arrived_at=0.0,
    )
    assert liveness.authorizations == {}
    assert liveness.due(now=10**9) == []


async def test_a_gateway_sampling_at_another_interval_is_reported_once(world: World) -> None:
    for gateway, interval in (("gw-same", 30.0), ("gw-rare", 120.0), ("gw-rare", 120.0)):
        sample = StatsSample(location_id=1, gateway_id=gateway, sample_id=uuid7(), sampled_at=world.gateway_now,
                             peers=[], stats_interval_s=interval)
        await world.bus.publish(subjects.stats(1, gateway), sample)

    async def reported() -> list[dict]:
        return [e for e in await read_stream(world.bus, subjects.EVENTS_ALL) if e["type"] == "reaper.stats_interval_mismatch"]

    found = await eventually(reported, what="the mismatch to be reported")
    await asyncio.sleep(0.5)  # and nothing more comes
    found = await reported()
    assert [(e["gateway_id"], e["gateway_interval_s"], e["reaper_interval_s"]) for e in found] == [("gw-rare", 120.0, 30.0)]


def test_a_reaper_told_to_stop_while_it_waits_for_the_streams_stops(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """No core has declared the streams yet, so the reaper is still starting: SIGTERM (what
    it gets when `wgmfa up` dies) must end it all the same, not leave it waiting for ever."""
    with running_nats() as nats:
        env = service_env(nats.plain_url, tmp_path / "state",
                          nats_credentials_dir=str(nats.credentials.directory))
        reaper = ServiceProcess("reaper_worker", env, tmp_path / "reaper.log")
        reaper.start()
        try:
            deadline = time.monotonic() + 30
            while "waiting for stream" not in reaper.log():
                assert reaper.process is not None and reaper.process.poll() is None, reaper.log()
                assert time.monotonic() < deadline, reaper.log()
                time.sleep(0.1)
            assert reaper.process is not None
            reaper.process.send_signal(signal.SIGTERM)
            assert reaper.process.wait(15) == 0, reaper.log()
            assert "stopping before it finished starting" in reaper.log()
        finally:
            reaper.stop()
