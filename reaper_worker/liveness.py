"""Liveness rules (docs/architecture.md, *Liveness*), free of I/O.

Every instant is kept on the reaper's own monotonic clock. A handshake's age comes from
one gateway sample (`sampled_at - latest_handshake`, both on that gateway's clock) and is
carried forward from the moment the sample arrived here, so clocks never get compared
across machines. The freshest handshake across a location's gateways counts.
"""
from __future__ import annotations

import hashlib
import uuid
from dataclasses import dataclass, field

from schemas.common import RevokeReason, uuid7
from schemas.events import PeerAuthorized, PeerRevoked, StatsSample


# Handshake times are whole seconds on the gateway, so a handshake right after the
# authorization can look up to a second older; it still counts as this session's.
HANDSHAKE_SLACK_S = 2.0


@dataclass
class Authorization:
    """A live MFA authorization the reaper watches."""

    state: PeerAuthorized
    sequence: int  # its stream sequence: a revoke expects it to still be the subject's last
    seen_at: float  # when it arrived, on the reaper's clock
    deadline: float  # seen_at + its lifetime
    revoked: bool = False

    @property
    def key(self) -> tuple[int, int]:
        return (self.state.location_id, self.state.device_id)


@dataclass
class Decision:
    authorization: Authorization
    reason: RevokeReason
    quiet_for_s: float


@dataclass
class Liveness:
    """What the reaper knows: watched authorizations and the freshest handshake per peer."""

    authorizations: dict[tuple[int, int], Authorization] = field(default_factory=dict)
    # (location_id, pubkey) -> the instant (reaper clock) of the freshest handshake seen
    handshakes: dict[tuple[int, str], float] = field(default_factory=dict)

    def on_peer_state(self, state: PeerAuthorized | PeerRevoked, sequence: int, arrived_at: float) -> None:
        key = (state.location_id, state.device_id)
        current = self.authorizations.get(key)
        if current is not None and current.state.generation > state.generation:
            return  # a late message about an older generation
        if isinstance(state, PeerRevoked) or state.threshold_s is None:
            # revoked, or a location without MFA: never reaped
            self.authorizations.pop(key, None)
            return
        lifetime = (state.expires_at - state.authorized_at).total_seconds() if state.expires_at else float("inf")
        self.authorizations[key] = Authorization(
            state=state, sequence=sequence, seen_at=arrived_at, deadline=arrived_at + lifetime
        )

    def on_sample(self, sample: StatsSample, arrived_at: float) -> None:
        for peer in sample.peers:
            if peer.latest_handshake is None:
                continue
            age = (sample.sampled_at - peer.latest_handshake).total_seconds()
            instant = arrived_at - max(age, 0.0)
            key = (sample.location_id, peer.pubkey)
            if instant > self.handshakes.get(key, float("-inf")):
                self.handshakes[key] = instant

    def due(self, now: float) -> list[Decision]:
        """Authorizations to revoke now, with the reason."""
        decisions = []
        for auth in self.authorizations.values():
            if auth.revoked:
                continue
            threshold = auth.state.threshold_s
            assert threshold is not None
            handshake = self.handshakes.get((auth.state.location_id, auth.state.pubkey))
            connected = handshake is not None and handshake >= auth.seen_at - HANDSHAKE_SLACK_S
            # A handshake from before this authorization (an earlier session) proves
            # nothing; the authorization itself starts the clock.
            last_activity = max(handshake, auth.seen_at) if handshake is not None else auth.seen_at
            quiet = now - last_activity
            if now >= auth.deadline:
                decisions.append(Decision(auth, RevokeReason.LIFETIME, quiet))
            elif quiet > threshold:
                reason = RevokeReason.IDLE if connected else RevokeReason.NEVER_CONNECTED
                decisions.append(Decision(auth, reason, quiet))
        return decisions

    def forget_handshakes_of_unknown_peers(self) -> None:
        """Drop handshakes of peers no longer watched, so memory follows the live set."""
        watched = {(a.state.location_id, a.state.pubkey) for a in self.authorizations.values()}
        for key in [k for k in self.handshakes if k not in watched]:
            del self.handshakes[key]


def revoke_for(decision: Decision) -> PeerRevoked:
    """The revoke every reaper makes for the same authorization and reason: its event id
    (and so its Nats-Msg-Id) is derived from them, so that NATS keeps one."""
    state = decision.authorization.state
    return PeerRevoked(
        event_id=deterministic_uuid7(state, decision.reason),
        location_id=state.location_id,
        device_id=state.device_id,
        generation=state.generation,
        session_id=state.session_id,
        pubkey=state.pubkey,
        reason=decision.reason,
    )


def deterministic_uuid7(state: PeerAuthorized, reason: RevokeReason) -> uuid.UUID:
    """A UUIDv7 whose time is the authorization's and whose random bits are a hash of
    (location, device, generation, reason)."""
    digest = hashlib.sha256(f"{state.location_id}:{state.device_id}:{state.generation}:{reason}".encode()).digest()
    return uuid7(int(state.authorized_at.timestamp() * 1000), int.from_bytes(digest[:10], "big"))
