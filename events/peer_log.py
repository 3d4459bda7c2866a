"""The peer log: stream WGMFA_PEERS keeps one message per `wgmfa.peer.<location>.<device>`,
the device's desired state at that location. Writers publish only over an older state
(by generation), with the subject's last sequence expected, so that concurrent writers
(cores, reapers) can never put an older state last.

A writer remembers the sequence of each subject's last state it saw (its own publishes, and
what its consumer of the stream delivers) and publishes over it without reading the
subject first; the expected sequence makes the server refuse the publish when anything
came since, and then the subject is read as before. A subject it has seen nothing of is
expected empty the same way."""
from __future__ import annotations

import logging
from dataclasses import dataclass

from faststream.nats import PubAck
from pydantic import ValidationError

from events import nats_direct, streams, subjects
from events.bus import Bus
from events.errors import BusUnavailable
from schemas import signing
from schemas.events import PEER_STATE_ADAPTER, PeerAuthorized, PeerRevoked, peer_state_order

log = logging.getLogger(__name__)


@dataclass
class PeerStateRecord:
    sequence: int
    state: PeerAuthorized | PeerRevoked | None  # None: the last message does not decode


# Subjects whose last sequence a writer remembers: about 250 bytes each, the oldest
# forgotten first (a forgotten subject costs one refused publish, then one read).
REMEMBERED_SUBJECTS = 100_000


class PeerLog:
    def __init__(self, bus: Bus, *, signing_key: str | None = None, remembered: int = REMEMBERED_SUBJECTS) -> None:
        self.bus = bus
        # The core's: a last authorization that this key did not sign (a forgery by a
        # credential that may publish revokes) does not hold back the true next state.
        self.signing_key = signing_key
        self.remembered = remembered
        # (location, device) -> (stream sequence, order) of the last state seen on its subject
        self._last: dict[tuple[int, int], tuple[int, tuple[int, int]]] = {}

    def seen(self, state: PeerAuthorized | PeerRevoked, sequence: int) -> None:
        """`state` is on its subject at stream sequence `sequence` (a later one replaces it)."""
        if self.remembered <= 0:
            return
        key = (state.location_id, state.device_id)
        known = self._last.get(key)
        if known is not None:
            if known[0] >= sequence:
                return
            del self._last[key]  # re-inserted last: the oldest seen is forgotten first
        elif len(self._last) >= self.remembered:
            del self._last[next(iter(self._last))]
        self._last[key] = (sequence, peer_state_order(state))

    async def last_peer_state(self, location_id: int, device_id: int) -> PeerStateRecord | None:
        last = await nats_direct.last_message(
            self.bus.broker, streams.PEERS.name, subjects.peer(location_id, device_id), timeout=self.bus.publish_timeout_s
        )
        if last is None:
            return None
        try:
            state = PEER_STATE_ADAPTER.validate_json(last.data)
        except ValidationError:
            log.error("undecodable peer state at sequence %s; treating the subject as empty", last.sequence)
            return PeerStateRecord(sequence=last.sequence, state=None)
        return PeerStateRecord(sequence=last.sequence, state=state)

    def _forged(self, state: PeerAuthorized | PeerRevoked) -> bool:
        if self.signing_key is None or not isinstance(state, PeerAuthorized):
            return False
        try:
            signing.verify(state, self.signing_key)
        except signing.SignatureInvalid:
            log.warning("the last state of device %s at location %s is not the core's; replacing it",
                        state.device_id, state.location_id)
            return True
        return False

    async def publish_peer_state(self, state: PeerAuthorized | PeerRevoked, *, attempts: int = 10) -> bool:
        """Compare-and-set: True when `state` is (now) the subject's last message."""
        subject = subjects.peer(state.location_id, state.device_id)
        if await self._publish_over_remembered(subject, state):
            return True
        for _ in range(attempts):
            last = await self.last_peer_state(state.location_id, state.device_id)
            if last is not None and last.state is not None and not self._forged(last.state):
                if last.state.event_id == state.event_id:
                    return True
                if peer_state_order(last.state) >= peer_state_order(state):
                    log.info(
                        "not publishing %s generation %s on %s: %s generation %s is newer",
                        state.type, state.generation, subject, last.state.type, last.state.generation,
                    )
                    return False
            if await self._publish_expecting(subject, state, last.sequence if last else 0) is not None:
                return True
        raise BusUnavailable(f"could not publish to {subject}: the subject keeps changing")

    async def _publish_over_remembered(self, subject: str, state: PeerAuthorized | PeerRevoked) -> bool:
        """Publish `state` over the subject's remembered last state (or over nothing, when
        none is remembered) if it is newer: True when the server took it as the next message.
        A remembered state as new as `state` or newer (it may be a forgery, or `state` itself)
        is left to the read, which checks it."""
        known = self._last.get((state.location_id, state.device_id))
        if known is not None and known[1] >= peer_state_order(state):
            return False
        ack = await self._publish_expecting(subject, state, known[0] if known else 0)
        # a duplicate was published before (a retried outbox row): whether it is still last, the read tells
        return ack is not None and not ack.duplicate

    async def _publish_expecting(self, subject: str, state: PeerAuthorized | PeerRevoked, sequence: int) -> PubAck | None:
        """Publish `state` if the subject's last message is at stream sequence `sequence`
        (0: the subject is empty): its ack, or None when the server refused it because
        another message came last. What it stored is remembered."""
        try:
            ack = await self.bus.publish(subject, state, expected_last_subject_seq=sequence)
        except Exception as exc:
            if nats_direct.is_wrong_last_sequence(exc):
                return None
            raise
        if not ack.duplicate:
            self.seen(state, ack.seq)
        return ack
