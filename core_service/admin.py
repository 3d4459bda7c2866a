"""Management: locations, users, TOTP enrollment, devices, sessions (`wgmfa admin`)."""
from __future__ import annotations

import ipaddress
from datetime import timedelta

from sqlalchemy.exc import IntegrityError
from sqlmodel import col, select
from sqlmodel.ext.asyncio.session import AsyncSession

from core_service import totp
from core_service.context import CoreContext
from core_service.models import Device, Location, LocationDevice, User, VpnSession
from core_service.outbox import enqueue_event, enqueue_peer_state
from core_service.sessions import find_location, find_user, names, parties, peer_authorized, revoke
from events.sealing import SealError, generate_keypair, is_key, seal
from schemas.common import LIVE_SESSION_STATES, MfaMode, RevokeReason, SessionState
from schemas.events import DeviceAdded, LocationCreated, TotpEnrolled, UserCreated
from schemas.rpc import (
    DeviceAddRequest,
    DeviceConfig,
    DeviceListRequest,
    DeviceListResult,
    EmailMfaRequest,
    ErrorStatus,
    GatewayCredentials,
    GatewayCredentialsRequest,
    GatewayCredentialsResult,
    LocationAddRequest,
    LocationAddResult,
    LocationInfo,
    LocationListResult,
    MobileAllowRequest,
    MobileAllowResult,
    RevokeRequest,
    RpcFailure,
    SessionInfo,
    SessionsRequest,
    SessionsResult,
    TotpConfirmRequest,
    TotpEnrollRequest,
    TotpEnrollResult,
    UserAddRequest,
    UserInfo,
    UserListResult,
)

MIN_LIFETIME_S = 60


def _invalid(message: str) -> RpcFailure:
    return RpcFailure(ErrorStatus.INVALID_ARGUMENT, message)


def parse_endpoint(endpoint: str) -> tuple[str, int]:
    host, sep, port_text = endpoint.strip().rpartition(":")
    if not sep or not host or not port_text.isdigit() or not 1 <= int(port_text) <= 65535:
        raise _invalid(f"endpoint must be HOST:PORT with a port from 1 to 65535, got {endpoint!r}")
    return host, int(port_text)


def location_info(location: Location) -> LocationInfo:
    return LocationInfo(
        id=location.id,  # type: ignore[arg-type]
        name=location.name,
        endpoint=location.endpoint,
        listen_port=location.listen_port,
        network=location.network,
        gateway_address=location.gateway_address,
        server_pubkey=location.wg_public_key,
        sealing_pubkey=location.sealing_public_key,
        mfa_mode=MfaMode(location.mfa_mode),
        threshold_s=location.peer_disconnect_threshold_s,
        lifetime_s=location.session_lifetime_s,
        keepalive_s=location.keepalive_s,
    )


def user_info(user: User) -> UserInfo:
    return UserInfo(
        id=user.id,  # type: ignore[arg-type]
        username=user.username,
        email=user.email,
        is_active=user.is_active,
        totp_enabled=user.totp_secret_enc is not None,
        email_mfa_enabled=user.email_mfa_enabled,
    )


def device_config(
    location: Location, device: Device, user: User, placement: LocationDevice, instance_id: str
) -> DeviceConfig:
    network = ipaddress.ip_network(location.network)
    return DeviceConfig(
        device_id=device.id,  # type: ignore[arg-type]
        device_name=device.name,
        username=user.username,
        pubkey=device.pubkey,
        location_id=location.id,  # type: ignore[arg-type]
        location_name=location.name,
        endpoint=location.endpoint,
        server_pubkey=location.wg_public_key,
        address=f"{placement.address}/{network.prefixlen}",
        allowed_ips=[str(network)],
        keepalive_s=location.keepalive_s,
        mfa_mode=MfaMode(location.mfa_mode),
        instance_id=instance_id,
    )


def session_info(vpn_session: VpnSession, location: Location, device: Device, user: User) -> SessionInfo:
    return SessionInfo(
        id=vpn_session.id,  # type: ignore[arg-type]
        generation=vpn_session.generation,
        location_id=location.id,  # type: ignore[arg-type]
        location_name=location.name,
        device_id=device.id,  # type: ignore[arg-type]
        device_name=device.name,
        username=user.username,
        method=vpn_session.method,  # type: ignore[arg-type]
        state=SessionState(vpn_session.state),
        authorized_at=vpn_session.authorized_at,
        connected_at=vpn_session.connected_at,
        expires_at=vpn_session.expires_at,
        revoked_at=vpn_session.revoked_at,
        revoke_reason=vpn_session.revoke_reason,  # type: ignore[arg-type]
    )


class Admin:
    def __init__(self, ctx: CoreContext) -> None:
        self.ctx = ctx

    # --- locations ----------------------------------------------------------------------

    async def location_add(self, req: LocationAddRequest) -> LocationAddResult:
        settings = self.ctx.settings
        if req.name.isdigit():
            raise _invalid("location name must not be a number (numbers refer to location ids)")
        _, port = parse_endpoint(req.endpoint)
        try:
            network = ipaddress.ip_network(req.network, strict=True)
        except ValueError as exc:
            raise _invalid(f"invalid network {req.network!r}: {exc}") from None
        if network.num_addresses < 4:
            raise _invalid(f"network {network} is too small: it needs room for the gateway and devices")
        threshold = req.threshold_s if req.threshold_s is not None else settings.default_threshold_s
        lifetime = req.lifetime_s if req.lifetime_s is not None else settings.default_lifetime_s
        keepalive = req.keepalive_s if req.keepalive_s is not None else settings.default_keepalive_s
        floor = settings.threshold_floor_s
        if req.mfa_mode != MfaMode.DISABLED and threshold < floor:
            raise _invalid(
                f"peer disconnect threshold {threshold} s is below the floor of {floor} s for an MFA location: "
                f"healthy peers rekey every 120-180 s, so it must be at least {settings.min_threshold_s} s "
                f"+ 2 x the {settings.stats_interval:g} s stats interval"
            )
        if threshold < 1:
            raise _invalid("peer disconnect threshold must be positive")
        if lifetime < MIN_LIFETIME_S:
            raise _invalid(f"session lifetime must be at least {MIN_LIFETIME_S} s")
        if not 1 <= keepalive <= 65535:
            raise _invalid("keepalive must be from 1 to 65535 s")
        wg_private, wg_public = generate_keypair()
        sealing_private, sealing_public = generate_keypair()
        gateway_host = next(iter(network.hosts()))
        location = Location(
            name=req.name,
            endpoint=req.endpoint.strip(),
            listen_port=port,
            network=str(network),
            gateway_address=f"{gateway_host}/{network.prefixlen}",
            wg_public_key=wg_public,
            wg_private_key_enc=self.ctx.vault.encrypt(wg_private),
            sealing_public_key=sealing_public,
            sealing_private_key_enc=self.ctx.vault.encrypt(sealing_private),
            mfa_mode=req.mfa_mode,
            peer_disconnect_threshold_s=threshold,
            session_lifetime_s=lifetime,
            keepalive_s=keepalive,
        )
        try:
            async with self.ctx.transaction() as session:
                session.add(location)
                await session.flush()
                enqueue_event(
                    session,
                    LocationCreated(
                        location_id=location.id,  # type: ignore[arg-type]
                        location_name=location.name,
                        mfa_mode=location.mfa_mode,
                        network=location.network,
                        threshold_s=threshold,
                        lifetime_s=lifetime,
                    ),
                )
        except IntegrityError:
            raise RpcFailure(ErrorStatus.CONFLICT, f"location {req.name} already exists") from None
        return LocationAddResult(
            location=location_info(location),
            credentials_sealed=self._sealed_credentials(location, req.reply_key),
        )

    def _sealed_credentials(self, location: Location, reply_key: str) -> str:
        credentials = GatewayCredentials(
            location_id=location.id,  # type: ignore[arg-type]
            location_name=location.name,
            private_key=self.ctx.vault.decrypt(location.wg_private_key_enc),
            sealing_private_key=self.ctx.vault.decrypt(location.sealing_private_key_enc),
            listen_port=location.listen_port,
            address=location.gateway_address,
            network=location.network,
            mfa_required=location.mfa_mode != MfaMode.DISABLED,
            core_signing_key=self.ctx.vault.peer_signer.public_key,
        )
        try:
            return seal(reply_key, credentials.model_dump_json())
        except SealError as exc:
            raise _invalid(f"reply_key: {exc}") from None

    async def gateway_credentials(self, req: GatewayCredentialsRequest) -> GatewayCredentialsResult:
        async with self.ctx.db.reader() as session:
            location = await find_location(session, req.location)
        return GatewayCredentialsResult(credentials_sealed=self._sealed_credentials(location, req.reply_key))

    async def location_list(self) -> LocationListResult:
        async with self.ctx.db.reader() as session:
            locations = (await session.exec(select(Location).order_by(col(Location.id)))).all()
        return LocationListResult(locations=[location_info(loc) for loc in locations])

    # --- users ----------------------------------------------------------------------------

    async def user_add(self, req: UserAddRequest) -> UserInfo:
        user = User(username=req.username, email=req.email)
        try:
            async with self.ctx.transaction() as session:
                session.add(user)
                await session.flush()
                enqueue_event(session, UserCreated(user_id=user.id, username=user.username))  # type: ignore[arg-type]
        except IntegrityError:
            raise RpcFailure(ErrorStatus.CONFLICT, f"user {req.username} already exists") from None
        return user_info(user)

    async def user_list(self) -> UserListResult:
        async with self.ctx.db.reader() as session:
            users = (await session.exec(select(User).order_by(col(User.id)))).all()
        return UserListResult(users=[user_info(u) for u in users])

    async def totp_enroll(self, req: TotpEnrollRequest) -> TotpEnrollResult:
        secret = totp.new_secret()
        try:
            sealed_uri = seal(req.reply_key, totp.provisioning_uri(secret, req.username, self.ctx.settings.totp_issuer))
        except SealError as exc:
            raise _invalid(f"reply_key: {exc}") from None
        async with self.ctx.transaction() as session:
            user = await find_user(session, req.username)
            # The active factor (if any) keeps working until the new one is confirmed.
            user.totp_pending_secret_enc = self.ctx.vault.encrypt(secret)
            session.add(user)
            enqueue_event(session, TotpEnrolled(user_id=user.id, username=user.username, confirmed=False))  # type: ignore[arg-type]
        return TotpEnrollResult(otpauth_uri_sealed=sealed_uri)

    async def totp_confirm(self, req: TotpConfirmRequest) -> UserInfo:
        try:
            code = self.ctx.vault.open_sealed(req.code_sealed)
        except SealError as exc:
            raise _invalid(f"code_sealed: {exc}") from None
        async with self.ctx.transaction() as session:
            user = await find_user(session, req.username)
            if user.totp_pending_secret_enc is None:
                raise _invalid(f"no TOTP enrollment is pending for {user.username}: run `totp enroll` first")
            secret = self.ctx.vault.decrypt(user.totp_pending_secret_enc)
            step = totp.matching_step(secret, code, self.ctx.clock.now())
            if step is None:
                raise RpcFailure(
                    ErrorStatus.UNAUTHENTICATED, "the code does not match the enrolled secret (check the device clock)"
                )
            user.totp_secret_enc = user.totp_pending_secret_enc
            user.totp_pending_secret_enc = None
            user.totp_last_step = step  # the confirmation code cannot be used to log in
            session.add(user)
            enqueue_event(session, TotpEnrolled(user_id=user.id, username=user.username, confirmed=True))  # type: ignore[arg-type]
        return user_info(user)

    async def email_mfa(self, req: EmailMfaRequest) -> UserInfo:
        async with self.ctx.transaction() as session:
            user = await find_user(session, req.username)
            user.email_mfa_enabled = req.enabled
            session.add(user)
        return user_info(user)

    # --- devices --------------------------------------------------------------------------

    async def mobile_allow(self, req: MobileAllowRequest) -> MobileAllowResult:
        """Let the phone app of this device register its signing key, once, for a while."""
        async with self.ctx.transaction() as session:
            user = await find_user(session, req.username)
            device = (
                await session.exec(select(Device).where(Device.user_id == user.id, Device.name == req.device_name))
            ).first()
            if device is None:
                raise RpcFailure(ErrorStatus.NOT_FOUND, f"device {req.device_name} of {user.username} not found")
            device.mobile_registration_until = self.ctx.clock.now() + timedelta(seconds=req.valid_s)
            session.add(device)
        return MobileAllowResult(
            username=user.username, device_name=device.name, device_pubkey=device.pubkey,
            until=device.mobile_registration_until,
        )

    async def device_add(self, req: DeviceAddRequest) -> DeviceConfig:
        if not is_key(req.pubkey):
            raise _invalid("invalid public key: expected base64 of 32 bytes")
        try:
            async with self.ctx.transaction() as session:
                result = await self._device_add(session, req)
        except IntegrityError:
            raise RpcFailure(ErrorStatus.CONFLICT, "the device conflicts with one added at the same moment; retry") from None
        return result

    async def _device_add(self, session: AsyncSession, req: DeviceAddRequest) -> DeviceConfig:
        user = await find_user(session, req.username)
        location = await find_location(session, req.location, lock=True)  # serialises address allocation
        device = (await session.exec(select(Device).where(Device.user_id == user.id, Device.name == req.name))).first()
        if device is None:
            if (await session.exec(select(Device.id).where(Device.pubkey == req.pubkey))).first() is not None:
                raise RpcFailure(ErrorStatus.CONFLICT, "a device with this public key already exists")
            device = Device(user_id=user.id, name=req.name, pubkey=req.pubkey)  # type: ignore[arg-type]
            session.add(device)
            await session.flush()
        elif device.pubkey != req.pubkey:
            raise RpcFailure(
                ErrorStatus.CONFLICT,
                f"device {req.name} of {user.username} already exists with another public key; pass its --pubkey",
            )
        existing = await session.get(LocationDevice, (location.id, device.id))
        if existing is not None:
            raise RpcFailure(ErrorStatus.CONFLICT, f"device {device.name} is already at location {location.name}")
        placement = LocationDevice(
            location_id=location.id,  # type: ignore[arg-type]
            device_id=device.id,  # type: ignore[arg-type]
            address=await self._free_address(session, location),
        )
        session.add(placement)
        await session.flush()
        enqueue_event(session, DeviceAdded(**names(location, device, user), address=placement.address))
        if location.mfa_mode == MfaMode.DISABLED:
            # Without MFA the peer is permanent, with no PSK, from now on.
            placement.generation = 1
            session.add(placement)
            enqueue_peer_state(
                session,
                peer_authorized(
                    self.ctx,
                    location,
                    device,
                    placement,
                    session_id=None,
                    psk=None,
                    authorized_at=self.ctx.clock.now(),
                    expires_at=None,
                ),
            )
        return device_config(location, device, user, placement, self.ctx.vault.instance_id)

    async def _free_address(self, session: AsyncSession, location: Location) -> str:
        network = ipaddress.ip_network(location.network)
        taken = set(
            (await session.exec(select(LocationDevice.address).where(LocationDevice.location_id == location.id))).all()
        )
        taken.add(location.gateway_address.split("/")[0])
        for host in network.hosts():
            if str(host) not in taken:
                return str(host)
        raise RpcFailure(ErrorStatus.CONFLICT, f"no free address left in {network} at location {location.name}")

    async def device_list(self, req: DeviceListRequest) -> DeviceListResult:
        async with self.ctx.db.reader() as session:
            query = (
                select(LocationDevice, Location, Device, User)
                .join(Location, col(Location.id) == LocationDevice.location_id)
                .join(Device, col(Device.id) == LocationDevice.device_id)
                .join(User, col(User.id) == Device.user_id)
                .order_by(col(Device.id), col(Location.id))
            )
            if req.username:
                query = query.where(User.username == req.username)
            rows = (await session.exec(query)).all()
        instance = self.ctx.vault.instance_id
        return DeviceListResult(devices=[device_config(loc, dev, usr, pl, instance) for pl, loc, dev, usr in rows])

    # --- sessions -------------------------------------------------------------------------

    async def sessions(self, req: SessionsRequest) -> SessionsResult:
        async with self.ctx.db.reader() as session:
            query = (
                select(VpnSession, Location, Device, User)
                .join(Location, col(Location.id) == VpnSession.location_id)
                .join(Device, col(Device.id) == VpnSession.device_id)
                .join(User, col(User.id) == VpnSession.user_id)
                .order_by(col(VpnSession.id).desc())
                .limit(req.limit)
            )
            if req.location:
                location = await find_location(session, req.location)
                query = query.where(VpnSession.location_id == location.id)
            if not req.include_revoked:
                query = query.where(col(VpnSession.state).in_(LIVE_SESSION_STATES))
            rows = (await session.exec(query)).all()
        return SessionsResult(sessions=[session_info(*row) for row in rows])

    async def revoke(self, req: RevokeRequest) -> SessionInfo:
        async with self.ctx.transaction() as session:
            vpn_session = (
                await session.exec(select(VpnSession).where(VpnSession.id == req.session_id).with_for_update())
            ).first()
            if vpn_session is None:
                raise RpcFailure(ErrorStatus.NOT_FOUND, f"session {req.session_id} not found")
            if vpn_session.state not in LIVE_SESSION_STATES:
                raise RpcFailure(ErrorStatus.CONFLICT, f"session {req.session_id} is already revoked")
            location, device, user = await parties(session, vpn_session)
            await revoke(session, vpn_session, location, device, user, RevokeReason.ADMIN, self.ctx.clock.now())
        return session_info(vpn_session, location, device, user)
