"""VPN sessions: issuing a PSK (authorize), revoking, and the lookups both need."""
from __future__ import annotations

from datetime import datetime, timedelta
from typing import NamedTuple

from sqlalchemy import bindparam, insert
from sqlalchemy import update as sql_update
from sqlmodel import col, select
from sqlmodel.ext.asyncio.session import AsyncSession

from core_service import metrics
from core_service.context import CoreContext
from core_service.db import prepared
from core_service.models import Device, Location, LocationDevice, User, VpnSession
from core_service.outbox import enqueue_event, enqueue_peer_state
from schemas.sealing import generate_psk, seal
from schemas.common import LIVE_SESSION_STATES, MfaMode, RevokeReason, SessionState
from schemas.events import PeerAuthorized, PeerRevoked, SessionAuthorized, SessionRevoked
from schemas.rpc import ErrorStatus, RpcFailure

PLACEMENTS = LocationDevice.__table__
SESSIONS = VpnSession.__table__
# authorize's statements, built once (every login runs them)
_NEXT_GENERATION = prepared(
    sql_update(PLACEMENTS)
    .where(PLACEMENTS.c.location_id == bindparam("b_location"), PLACEMENTS.c.device_id == bindparam("b_device"))
    .values(generation=PLACEMENTS.c.generation + 1)
    .returning(PLACEMENTS.c.generation, PLACEMENTS.c.address)
)
_LIVE_SESSIONS = prepared(
    select(SESSIONS.c.id, SESSIONS.c.generation, SESSIONS.c.state).where(
        SESSIONS.c.location_id == bindparam("b_location"),
        SESSIONS.c.device_id == bindparam("b_device"),
        SESSIONS.c.state.in_(LIVE_SESSION_STATES),
    )
)
_SUPERSEDE = prepared(  # one session at a time: a list of ids would make its SQL differ per call
    sql_update(SESSIONS)
    .where(SESSIONS.c.id == bindparam("b_id"))
    .values(state=SessionState.REVOKED, revoked_at=bindparam("b_now"), revoke_reason=RevokeReason.REPLACED, psk_enc=None)
)
_INSERT_SESSION = prepared(insert(SESSIONS).returning(SESSIONS.c.id))


class Placed(NamedTuple):
    """A device's address and generation at a location, as a login's authorize takes them."""

    address: str
    generation: int


class Authorized(NamedTuple):
    """The session a login's authorize issued."""

    id: int
    generation: int


def names(location: Location, device: Device, user: User) -> dict[str, object]:
    """The identifying fields every audit event about a device at a location carries."""
    return {
        "location_id": location.id,
        "location_name": location.name,
        "device_id": device.id,
        "device_name": device.name,
        "user_id": user.id,
        "username": user.username,
    }


async def parties(session: AsyncSession, vpn_session: VpnSession) -> tuple[Location, Device, User]:
    """The location, device and user a session belongs to."""
    location = await session.get(Location, vpn_session.location_id)
    device = await session.get(Device, vpn_session.device_id)
    user = await session.get(User, vpn_session.user_id)
    assert location is not None and device is not None and user is not None
    return location, device, user


async def find_location(session: AsyncSession, ref: str | int, *, lock: bool = False) -> Location:
    """A location by id or name (locked for update when asked); 404 when there is none
    (or it was removed)."""
    text = str(ref)
    query = select(Location).where(Location.id == int(text)) if text.isdigit() else select(Location).where(Location.name == text)
    query = query.where(col(Location.removed_at).is_(None))
    location = (await session.exec(query.with_for_update() if lock else query)).first()
    if location is None:
        raise RpcFailure(ErrorStatus.NOT_FOUND, f"location {text} not found")
    return location


async def find_user(session: AsyncSession, username: str, *, lock: bool = False) -> User:
    query = select(User).where(User.username == username, col(User.deleted_at).is_(None))
    user = (await session.exec(query.with_for_update() if lock else query)).first()
    if user is None:
        raise RpcFailure(ErrorStatus.NOT_FOUND, f"user {username} not found")
    return user


def peer_authorized(
    ctx: CoreContext,
    location: Location,
    device: Device,
    placement: LocationDevice | Placed,
    *,
    session_id: int | None,
    psk: str | None,
    authorized_at: datetime,
    expires_at: datetime | None,
) -> PeerAuthorized:
    mfa = location.mfa_mode != MfaMode.DISABLED
    state = PeerAuthorized(
        location_id=location.id,  # type: ignore[arg-type]
        device_id=device.id,  # type: ignore[arg-type]
        generation=placement.generation,
        session_id=session_id,
        pubkey=device.pubkey,
        allowed_ips=[f"{placement.address.split('/')[0]}/32"],
        keepalive_s=location.keepalive_s,
        psk_sealed=seal(location.sealing_public_key, psk) if psk else None,
        authorized_at=authorized_at,
        expires_at=expires_at,
        threshold_s=location.peer_disconnect_threshold_s if mfa else None,
    )
    return ctx.vault.peer_signer.sign(state)


def session_revoked(
    location: Location,
    device: Device,
    user: User,
    session_id: int,
    generation: int,
    reason: RevokeReason,
    previous: SessionState,
) -> SessionRevoked:
    return SessionRevoked(
        **names(location, device, user), session_id=session_id, generation=generation, reason=reason, previous_state=previous
    )


async def revoke(
    session: AsyncSession,
    vpn_session: VpnSession,
    location: Location,
    device: Device,
    user: User,
    reason: RevokeReason,
    now: datetime,
    *,
    publish_peer: bool = True,
) -> None:
    """Mark a live session revoked, forget its PSK, and (unless a newer authorize replaces
    it) tell every gateway to remove the peer."""
    previous = SessionState(vpn_session.state)
    vpn_session.state = SessionState.REVOKED
    vpn_session.revoked_at = now
    vpn_session.revoke_reason = reason
    vpn_session.psk_enc = None
    session.add(vpn_session)
    metrics.SESSIONS_REVOKED.labels(reason.value).inc()
    enqueue_event(
        session, session_revoked(location, device, user, vpn_session.id, vpn_session.generation, reason, previous)  # type: ignore[arg-type]
    )
    if publish_peer:
        enqueue_peer_state(
            session,
            PeerRevoked(
                location_id=location.id,  # type: ignore[arg-type]
                device_id=device.id,  # type: ignore[arg-type]
                generation=vpn_session.generation,
                session_id=vpn_session.id,
                pubkey=device.pubkey,
                reason=reason,
            ),
        )


async def authorize(
    ctx: CoreContext,
    session: AsyncSession,
    location: Location,
    device: Device,
    user: User,
    *,
    method: str,
    login_id: object,
    now: datetime,
) -> tuple[Authorized, str]:
    """Issue a fresh PSK for the device at the location: supersede its live session, take
    the next generation, and queue peer.authorized (PSK sealed to the location)."""
    # Core statements, not ORM loads and flushes: this is every login's path.
    # The next generation first: it locks the device's row at the location, so that of two
    # authorizations racing for one device the second sees the first's session below.
    where = {"b_location": location.id, "b_device": device.id}
    placed = (await session.exec(_NEXT_GENERATION, params=where)).first()
    if placed is None:
        raise RpcFailure(ErrorStatus.INVALID_ARGUMENT, "device not found")
    generation, address = placed
    live = (await session.exec(_LIVE_SESSIONS, params=where)).all()
    for old in live:  # superseded: it leaves the live index before the new one enters
        await session.exec(_SUPERSEDE, params={"b_id": old.id, "b_now": now})
        enqueue_event(
            session,
            session_revoked(location, device, user, old.id, old.generation, RevokeReason.REPLACED, SessionState(old.state)),
        )

    psk = generate_psk()
    expires_at = now + timedelta(seconds=location.session_lifetime_s)
    # the row's values as they are (a VpnSession instance would cost more than the insert)
    session_id = (
        await session.exec(
            _INSERT_SESSION,
            params={
                "generation": generation, "location_id": location.id, "device_id": device.id, "user_id": user.id,
                "login_id": login_id, "method": method, "psk_enc": ctx.vault.encrypt(psk),
                "state": SessionState.AUTHORIZED, "authorized_at": now, "expires_at": expires_at,
            },
        )
    ).scalar_one()
    enqueue_peer_state(
        session,
        peer_authorized(
            ctx, location, device, Placed(address, generation), session_id=session_id, psk=psk, authorized_at=now,
            expires_at=expires_at,
        ),
    )
    enqueue_event(
        session,
        SessionAuthorized(
            **names(location, device, user),
            session_id=session_id,
            generation=generation,
            method=method,  # type: ignore[arg-type]
            expires_at=expires_at,
        ),
    )
    return Authorized(session_id, generation), psk


async def live_sessions(session: AsyncSession, location_id: int, device_id: int) -> list[VpnSession]:
    """The device's live session(s) at the location, locked."""
    return list(
        (
            await session.exec(
                select(VpnSession)
                .where(
                    VpnSession.location_id == location_id,
                    VpnSession.device_id == device_id,
                    col(VpnSession.state).in_(LIVE_SESSION_STATES),
                )
                .with_for_update()
            )
        ).all()
    )


async def retract_peer(
    session: AsyncSession,
    location: Location,
    device: Device,
    user: User,
    placement: LocationDevice,
    reason: RevokeReason,
    now: datetime,
) -> int:
    """Take the device off every gateway of the location whatever its state: end its live
    session, and queue peer.revoked with a generation of its own, so that it orders after
    anything published for the device before. Returns the sessions it ended."""
    ended = 0
    for live in await live_sessions(session, location.id, device.id):  # type: ignore[arg-type]
        await revoke(session, live, location, device, user, reason, now, publish_peer=False)
        ended += 1
    placement.generation += 1
    session.add(placement)
    enqueue_peer_state(
        session,
        PeerRevoked(
            location_id=location.id,  # type: ignore[arg-type]
            device_id=device.id,  # type: ignore[arg-type]
            generation=placement.generation,
            pubkey=device.pubkey,
            reason=reason,
        ),
    )
    return ended


async def reissue_peer(
    ctx: CoreContext, session: AsyncSession, location: Location, device: Device, placement: LocationDevice, now: datetime
) -> bool:
    """Publish the device's peer anew from the location's current settings, under the next
    generation: without MFA the permanent peer without PSK; with MFA the live session's
    peer with its PSK (the session moves to the new generation; its reaper clock starts
    over with what is left of its lifetime). False when there is nothing to put on."""
    if location.mfa_mode == MfaMode.DISABLED:
        placement.generation += 1
        session.add(placement)
        enqueue_peer_state(
            session,
            peer_authorized(ctx, location, device, placement, session_id=None, psk=None, authorized_at=now, expires_at=None),
        )
        return True
    live = await live_sessions(session, location.id, device.id)  # type: ignore[arg-type]
    if not live or live[0].psk_enc is None:
        return False
    vpn_session = live[0]
    placement.generation += 1
    vpn_session.generation = placement.generation
    session.add(placement)
    session.add(vpn_session)
    enqueue_peer_state(
        session,
        peer_authorized(
            ctx, location, device, placement, session_id=vpn_session.id, psk=ctx.vault.decrypt(vpn_session.psk_enc),
            authorized_at=now, expires_at=vpn_session.expires_at,
        ),
    )
    return True
