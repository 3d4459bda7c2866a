"""The peer log's compare-and-set on a real nats-server: a writer publishes over the last
state it saw without reading the subject, and whatever it did not see (another writer's
state, a forgery) is still read and never overwritten by an older state."""
from __future__ import annotations

from collections.abc import AsyncIterator

import pytest_asyncio

from events.bus import Bus
from events.peer_log import PeerLog
from schemas.common import utcnow
from schemas.common import RevokeReason
from schemas.events import PeerAuthorized, PeerRevoked
from schemas.signing import PeerSigner

LOCATION = 7
SIGNER = PeerSigner(b"s" * 32)


def authorized(generation: int, device: int = 1) -> PeerAuthorized:
    return SIGNER.sign(PeerAuthorized(location_id=LOCATION, device_id=device, generation=generation, pubkey=f"key{device}",
                                      allowed_ips=[], keepalive_s=25, authorized_at=utcnow()))


def revoked(generation: int, device: int = 1) -> PeerRevoked:
    return PeerRevoked(location_id=LOCATION, device_id=device, generation=generation, pubkey=f"key{device}",
                       reason=RevokeReason.IDLE)


@pytest_asyncio.fixture
async def bus(nats_url: str) -> AsyncIterator[Bus]:
    bus = await Bus.connect(nats_url, "test", wait_s=5)
    await bus.ensure_streams()
    try:
        yield bus
    finally:
        await bus.close()


class CountingLog(PeerLog):
    """A peer log that counts its reads of a subject."""

    reads = 0

    async def last_peer_state(self, location_id: int, device_id: int):  # type: ignore[no-untyped-def]
        self.reads += 1
        return await super().last_peer_state(location_id, device_id)


async def last(bus: Bus, device: int = 1) -> PeerAuthorized | PeerRevoked | None:
    record = await PeerLog(bus).last_peer_state(LOCATION, device)
    assert record is not None
    return record.state


async def test_states_over_what_a_writer_saw_go_out_without_a_read(bus: Bus) -> None:
    log = CountingLog(bus, signing_key=SIGNER.public_key)
    first = authorized(1)
    assert await log.publish_peer_state(first)  # a subject never written: expected empty
    delivered = await PeerLog(bus).last_peer_state(LOCATION, 1)
    revoke = revoked(1)
    assert await log.publish_peer_state(revoke)  # over its own publish
    assert delivered is not None
    log.seen(first, delivered.sequence)  # its consumer delivers the earlier state late: kept back
    relogin = authorized(2)
    assert await log.publish_peer_state(relogin)
    # another writer (the reaper) revokes; the core's consumer delivers it with its sequence
    assert await PeerLog(bus).publish_peer_state(revoked(3, device=2))
    seen = await PeerLog(bus).last_peer_state(LOCATION, 2)
    assert seen is not None and seen.state is not None
    log.seen(seen.state, seen.sequence)
    login = authorized(4, device=2)
    assert await log.publish_peer_state(login)
    assert log.reads == 0
    assert await last(bus) == relogin and await last(bus, 2) == login


async def test_a_state_the_writer_did_not_see_is_read_and_an_older_one_never_replaces_it(bus: Bus) -> None:
    log = CountingLog(bus, signing_key=SIGNER.public_key)
    assert await log.publish_peer_state(authorized(1))
    behind = revoked(2)
    assert await PeerLog(bus).publish_peer_state(behind)  # behind the writer's back
    assert not await log.publish_peer_state(authorized(2))  # refused by the server, then read: older
    assert log.reads == 1 and await last(bus) == behind
    newer = authorized(3)
    assert await log.publish_peer_state(newer)  # published over what the read found
    assert log.reads == 2 and await last(bus) == newer
    # a writer that remembers nothing (a restarted core) expects an empty subject, is
    # refused, and reads
    fresh = CountingLog(bus, signing_key=SIGNER.public_key)
    revoke = revoked(3)
    assert await fresh.publish_peer_state(revoke)
    assert fresh.reads == 1 and await last(bus) == revoke


async def test_a_remembered_forgery_is_checked_by_the_read_and_replaced(bus: Bus) -> None:
    log = CountingLog(bus, signing_key=SIGNER.public_key)
    forged = authorized(50).model_copy(update={"signature": None})
    assert await PeerLog(bus).publish_peer_state(forged)
    seen = await PeerLog(bus).last_peer_state(LOCATION, 1)
    assert seen is not None and seen.state == forged
    log.seen(forged, seen.sequence)  # as the core's consumer would deliver it
    true_state = authorized(2)
    assert await log.publish_peer_state(true_state)
    assert log.reads == 1 and await last(bus) == true_state


async def test_a_retried_state_is_published_once(bus: Bus) -> None:
    log = CountingLog(bus, signing_key=SIGNER.public_key)
    state = authorized(1)
    assert await log.publish_peer_state(state)
    first = await PeerLog(bus).last_peer_state(LOCATION, 1)
    assert await log.publish_peer_state(state)  # the outbox row retried
    restarted = CountingLog(bus, signing_key=SIGNER.public_key)
    assert await restarted.publish_peer_state(state)  # retried after a restart
    assert await PeerLog(bus).last_peer_state(LOCATION, 1) == first


async def test_the_oldest_subjects_are_forgotten_first(bus: Bus) -> None:
    log = CountingLog(bus, signing_key=SIGNER.public_key, remembered=2)
    states = {device: authorized(1, device=device) for device in (1, 2, 3)}
    for state in states.values():
        assert await log.publish_peer_state(state)
    # device 1 was forgotten: its next state expects an empty subject, is refused and reads
    states[3] = revoked(1, device=3)
    assert await log.publish_peer_state(states[3])
    assert log.reads == 0
    states[1] = revoked(1, device=1)
    assert await log.publish_peer_state(states[1])
    assert log.reads == 1
    assert [await last(bus, d) for d in (1, 2, 3)] == list(states.values())


async def test_a_writer_that_remembers_nothing_reads_every_subject_it_wrote_before(bus: Bus) -> None:
    log = CountingLog(bus, signing_key=SIGNER.public_key, remembered=0)
    states = [authorized(1), revoked(1), authorized(2)]
    for state in states:
        assert await log.publish_peer_state(state)
    assert log.reads == 2 and await last(bus) == states[-1]  # the first expected an empty subject
