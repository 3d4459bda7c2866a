"""What the data plane tells the core: revokes (from the reaper) end sessions, and a
session's first handshake marks it connected."""
from __future__ import annotations

import logging
from datetime import datetime, timedelta

from sqlalchemy.dialects.postgresql import insert as postgresql_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlmodel import col, delete, select
from sqlmodel.ext.asyncio.session import AsyncSession

from core_service.context import CoreContext
from core_service.models import Device, Location, LocationDevice, PeerStat, VpnSession
from core_service.outbox import enqueue_event
from core_service.sessions import names, parties, revoke
from events.outcomes import stream_sequence
from events.peer_log import PeerLog
from schemas.common import LIVE_SESSION_STATES, SessionState
from schemas.events import PeerAuthorized, PeerRevoked, SessionConnected, StatsSample

log = logging.getLogger(__name__)

# A handshake this much before the authorization (clock jitter between samples) still counts.
HANDSHAKE_SLACK = timedelta(seconds=2)
# Samples of peers a gateway no longer reports (or of a gateway that stopped) are dropped
# after this many stats intervals.
STATS_KEPT_INTERVALS = 10


class DataPlane:
    def __init__(self, ctx: CoreContext, peers: PeerLog) -> None:
        self.ctx = ctx
        self.peers = peers

    async def on_peer_state(self, state: PeerAuthorized | PeerRevoked) -> None:
        """A revoke ends the session it names (if that is still the live one) and forgets
        its PSK. Revokes the core published itself find the session already ended."""
        # the device's next state (a login after the reaper's revoke) goes out over this one
        # without a read of the subject
        sequence = stream_sequence()
        if sequence is not None:
            self.peers.seen(state, sequence)
        if not isinstance(state, PeerRevoked):
            return
        await self._release_placement(state)
        if state.session_id is None:
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

    async def _release_placement(self, state: PeerRevoked) -> None:
        """Give back the address of a removed device (or of a device at a removed location)
        once its last revoke is on the peer stream, which every gateway converges to: until
        then a gateway may still hold the old peer with that address."""
        query = (
            select(LocationDevice, Device, Location)
            .join(Device, col(Device.id) == LocationDevice.device_id)
            .join(Location, col(Location.id) == LocationDevice.location_id)
            .where(
                LocationDevice.location_id == state.location_id,
                LocationDevice.device_id == state.device_id,
                LocationDevice.generation == state.generation,  # the device's last state
                (col(Device.removed_at).is_not(None)) | (col(Location.removed_at).is_not(None)),
            )
        )
        async with self.ctx.db.reader() as session:  # most revokes release nothing: no write
            if (await session.exec(query)).first() is None:
                return
        async with self.ctx.transaction() as session:
            row = (await session.exec(query.with_for_update(of=LocationDevice))).first()  # type: ignore[arg-type]
            if row is None:
                return
            placement = row[0]
            await session.delete(placement)
        log.info("address %s at location %s given back", placement.address, state.location_id)

    async def _keep_latest(self, session: AsyncSession, sample: StatsSample, now: datetime) -> None:
        """Upsert the latest sample of each peer of this gateway in one statement, so that
        `sessions --live` answers the same on every core (each sample is consumed by one)."""
        if sample.peers:
            rows = [
                {
                    "location_id": sample.location_id,
                    "gateway_id": sample.gateway_id[:64],
                    "pubkey": peer.pubkey[:64],
                    "endpoint": (peer.endpoint or None) and peer.endpoint[:128],
                    "handshake_at": None if peer.latest_handshake is None
                    else now - (sample.sampled_at - peer.latest_handshake),
                    "rx_bytes": min(peer.rx_bytes, 2**63 - 1),
                    "tx_bytes": min(peer.tx_bytes, 2**63 - 1),
                    "sampled_at": now,
                }
                for peer in sample.peers
            ]
            insert = sqlite_insert if self.ctx.db.is_sqlite else postgresql_insert
            statement = insert(PeerStat)
            statement = statement.on_conflict_do_update(
                index_elements=["location_id", "gateway_id", "pubkey"],
                set_={key: statement.excluded[key] for key in ("endpoint", "handshake_at", "rx_bytes", "tx_bytes", "sampled_at")},
            )
            await session.exec(statement, params=rows)  # type: ignore[call-overload]
        if sample.parts == 1:
            # a whole sample: peers it does not list are no longer on this gateway
            await session.exec(
                delete(PeerStat).where(
                    PeerStat.location_id == sample.location_id,
                    PeerStat.gateway_id == sample.gateway_id[:64],
                    col(PeerStat.sampled_at) < now,
                )
            )

    async def purge_stats(self) -> int:
        """Drop samples no gateway refreshed for a while."""
        cutoff = self.ctx.clock.now() - timedelta(seconds=STATS_KEPT_INTERVALS * self.ctx.settings.stats_interval)
        async with self.ctx.transaction() as session:
            result = await session.exec(delete(PeerStat).where(col(PeerStat.sampled_at) < cutoff))
        return result.rowcount or 0

    async def on_sample(self, sample: StatsSample) -> None:
        """Mark authorized sessions of the location connected at their first handshake after
        the authorization. The handshake's time is the gateway's; it is placed on the core's
        clock by its age in the sample, never compared with the gateway's clock directly.
        Keeps the latest sample of every peer for `sessions --live`."""
        seen = {p.pubkey: p for p in sample.peers if p.latest_handshake is not None}
        now = self.ctx.clock.now()
        async with self.ctx.transaction() as session:
            await self._keep_latest(session, sample, now)
            if not seen:
                return
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
