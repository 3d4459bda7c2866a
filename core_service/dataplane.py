"""What the data plane tells the core: revokes (from the reaper) end sessions, and a
session's first handshake marks it connected."""
from __future__ import annotations

import logging
from datetime import timedelta

from sqlmodel import col, select

from core_service.context import CoreContext
from core_service.models import Device, VpnSession
from core_service.outbox import enqueue_event
from core_service.sessions import names, parties, revoke
from schemas.common import LIVE_SESSION_STATES, SessionState
from schemas.events import PeerAuthorized, PeerRevoked, SessionConnected, StatsSample

log = logging.getLogger(__name__)

# A handshake this much before the authorization (clock jitter between samples) still counts.
HANDSHAKE_SLACK = timedelta(seconds=2)


class DataPlane:
    def __init__(self, ctx: CoreContext) -> None:
        self.ctx = ctx

    async def on_peer_state(self, state: PeerAuthorized | PeerRevoked) -> None:
        """A revoke ends the session it names (if that is still the live one) and forgets
        its PSK. Revokes the core published itself find the session already ended."""
        if not isinstance(state, PeerRevoked) or state.session_id is None:
            return
        async with self.ctx.transaction() as session:
            vpn_session = (
                await session.exec(select(VpnSession).where(VpnSession.id == state.session_id).with_for_update())
            ).first()
            if (
                vpn_session is None
                or vpn_session.state not in LIVE_SESSION_STATES
                or vpn_session.generation != state.generation
                or vpn_session.location_id != state.location_id
                or vpn_session.device_id != state.device_id
            ):
                return
            location, device, user = await parties(session, vpn_session)
            await revoke(
                session, vpn_session, location, device, user, state.reason, self.ctx.clock.now(), publish_peer=False
            )
        log.info("session %s revoked by the data plane: %s", state.session_id, state.reason.value)

    async def on_sample(self, sample: StatsSample) -> None:
        """Mark authorized sessions of the location connected at their first handshake after
        the authorization. The handshake's time is the gateway's; it is placed on the core's
        clock by its age in the sample, never compared with the gateway's clock directly."""
        seen = {p.pubkey: p for p in sample.peers if p.latest_handshake is not None}
        if not seen:
            return
        now = self.ctx.clock.now()
        async with self.ctx.transaction() as session:
            rows = (
                await session.exec(
                    select(VpnSession, Device)
                    .join(Device, col(Device.id) == VpnSession.device_id)
                    .where(VpnSession.location_id == sample.location_id, VpnSession.state == SessionState.AUTHORIZED)
                    .with_for_update(of=VpnSession)
                )
            ).all()
            for vpn_session, device in rows:
                peer = seen.get(device.pubkey)
                if peer is None or peer.latest_handshake is None:
                    continue
                handshake_at = now - (sample.sampled_at - peer.latest_handshake)
                if handshake_at < vpn_session.authorized_at - HANDSHAKE_SLACK:
                    continue  # a handshake of an earlier session
                vpn_session.state = SessionState.CONNECTED
                vpn_session.connected_at = min(handshake_at, now)
                session.add(vpn_session)
                location, _, user = await parties(session, vpn_session)
                enqueue_event(
                    session,
                    SessionConnected(
                        **names(location, device, user),
                        session_id=vpn_session.id,  # type: ignore[arg-type]
                        generation=vpn_session.generation,
                        connected_at=vpn_session.connected_at,
                        gateway_id=sample.gateway_id,
                    ),
                )
