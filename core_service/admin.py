"""Management: locations, users, TOTP enrollment, devices, sessions (`wgmfa admin`)."""
from __future__ import annotations

import ipaddress
import uuid
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy.exc import IntegrityError
from sqlmodel import col, delete, select, update
from sqlmodel.ext.asyncio.session import AsyncSession

from core_service import factor_setup, totp
from core_service.context import CoreContext
from core_service.dataplane import HANDSHAKE_SLACK
from core_service.keys import new_token
from core_service.mfa import lockout_state, reset_failures
from core_service.models import Device, Location, LocationDevice, MfaLogin, MobileKey, PeerStat, User, VpnSession
from core_service.oidc import NOT_CONFIGURED, provider_configured
from core_service.outbox import enqueue_event, enqueue_peer_state
from core_service.sessions import (
    find_location,
    find_user,
    live_sessions,
    names,
    parties,
    peer_authorized,
    reissue_peer,
    retract_peer,
    revoke,
)
from schemas.sealing import SealError, generate_keypair, is_key, seal
from schemas.common import LIVE_LOGIN_STATES, LIVE_SESSION_STATES, LoginState, MfaMode, RevokeReason, SessionState
from schemas.events import (
    DeviceAdded,
    DeviceChanged,
    FactorChanged,
    FieldChange,
    LocationChanged,
    LocationCreated,
    UserChanged,
    UserCreated,
)
from schemas.rpc import (
    DeviceAddRequest,
    DeviceChangeResult,
    DeviceConfig,
    DeviceListRequest,
    DeviceListResult,
    DeviceRef,
    DeviceRenameRequest,
    EmailMfaRequest,
    ErrorStatus,
    FactorRemoveRequest,
    GatewayCredentials,
    GatewayCredentialsRequest,
    GatewayCredentialsResult,
    LocationAddRequest,
    LocationAddResult,
    LocationChangeResult,
    LocationInfo,
    LocationListResult,
    LocationRemoveRequest,
    LocationSetRequest,
    MobileAllowRequest,
    MobileAllowResult,
    MobileRemoveRequest,
    RevokeRequest,
    RpcFailure,
    SessionInfo,
    SessionsRequest,
    SessionsResult,
    TotpConfirmRequest,
    TotpEnrollRequest,
    TotpEnrollResult,
    UserAddRequest,
    UserChangeRequest,
    UserChangeResult,
    UserDetail,
    UserFactors,
    UserInfo,
    UserListResult,
    UserRef,
    UserSetRequest,
    actor_of,
)


MIN_LIFETIME_S = 60
MOBILE_CODE_BITS = 128


def new_mobile_code() -> str:
    return new_token(MOBILE_CODE_BITS)


def mobile_code_hash(ctx: CoreContext, device: Device, code: str) -> str:
    """A keyed hash of a mobile registration code, bound to its device."""
    return ctx.vault.code_hash(uuid.UUID(int=device.id), code)  # type: ignore[arg-type]


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
        allowed_ips=list(location.allowed_ips),
        dns=list(location.dns),
    )


def tombstone_name(name: str, row_id: object, what: str) -> str:
    """A name no live row can have (`#` is not allowed in names), freeing the original."""
    return f"{name[:40]}#{what}-{row_id}"


def parse_vpn_network(text: str) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    try:
        network = ipaddress.ip_network(text, strict=True)
    except ValueError as exc:
        raise _invalid(f"invalid network {text!r}: {exc}") from None
    if network.num_addresses < 4:
        raise _invalid(f"network {network} is too small: it needs room for the gateway and devices")
    return network


def gateway_address(network: ipaddress.IPv4Network | ipaddress.IPv6Network) -> str:
    """The gateway takes the network's first host address."""
    return f"{next(iter(network.hosts()))}/{network.prefixlen}"


def parse_networks(values: list[str], what: str) -> list[str]:
    networks = []
    for value in values:
        try:
            network = ipaddress.ip_network(value.strip(), strict=True)
        except ValueError as exc:
            raise _invalid(f"{what} {value!r} is not a network (CIDR such as 192.168.10.0/24): {exc}") from None
        if str(network) not in networks:
            networks.append(str(network))
    return networks


def parse_addresses(values: list[str], what: str) -> list[str]:
    addresses = []
    for value in values:
        try:
            addresses.append(str(ipaddress.ip_address(value.strip())))
        except ValueError:
            raise _invalid(f"{what} {value!r} is not an IP address") from None
    return addresses


def masked_email(address: str) -> str:
    local, _, domain = address.partition("@")
    return f"{local[:1]}***@{domain}"


def user_info(user: User) -> UserInfo:
    return UserInfo(
        id=user.id,  # type: ignore[arg-type]
        username=user.username,
        email=user.email,
        is_active=user.is_active,
        totp_enabled=user.totp_secret_enc is not None,
        email_mfa_enabled=user.email_mfa_enabled,
        oidc_issuer=user.oidc_issuer,
        oidc_subject=user.oidc_subject,
    )


def client_allowed_ips(location: Location) -> list[str]:
    """What a client routes through the tunnel: the location's own network, then the
    company networks the gateway routes."""
    return [str(ipaddress.ip_network(location.network)), *location.allowed_ips]


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
        allowed_ips=client_allowed_ips(location),
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


async def free_address(session: AsyncSession, location: Location) -> str:
    network = ipaddress.ip_network(location.network)
    taken = set(
        (await session.exec(select(LocationDevice.address).where(LocationDevice.location_id == location.id))).all()
    )
    taken.add(location.gateway_address.split("/")[0])
    for host in network.hosts():
        if str(host) not in taken:
            return str(host)
    raise RpcFailure(ErrorStatus.CONFLICT, f"no free address left in {network} at location {location.name}")


async def place_device(
    ctx: CoreContext, session: AsyncSession, location: Location, device: Device, user: User, *, actor: str | None = None
) -> LocationDevice:
    """Put the device at the location with a free address (the caller holds the location's
    row lock, which serialises allocation); at a location without MFA its peer is
    authorized for good, with no PSK, at once."""
    placement = LocationDevice(
        location_id=location.id,  # type: ignore[arg-type]
        device_id=device.id,  # type: ignore[arg-type]
        address=await free_address(session, location),
    )
    session.add(placement)
    await session.flush()
    enqueue_event(session, DeviceAdded(**names(location, device, user), address=placement.address, actor=actor))
    if location.mfa_mode == MfaMode.DISABLED and user.is_active:
        placement.generation = 1
        session.add(placement)
        enqueue_peer_state(
            session,
            peer_authorized(
                ctx, location, device, placement, session_id=None, psk=None, authorized_at=ctx.clock.now(), expires_at=None
            ),
        )
    return placement


async def _check_provider_for(session: AsyncSession, mode: MfaMode) -> None:
    """External MFA sends users to the company's OpenID provider: refused while there is none."""
    if mode == MfaMode.EXTERNAL and not await provider_configured(session):
        raise _invalid(f"external MFA needs an OpenID provider; {NOT_CONFIGURED}")


class Admin:
    def __init__(self, ctx: CoreContext) -> None:
        self.ctx = ctx

    # --- locations ----------------------------------------------------------------------

    async def location_add(self, req: LocationAddRequest) -> LocationAddResult:
        settings = self.ctx.settings
        if req.name.isdigit():
            raise _invalid("location name must not be a number (numbers refer to location ids)")
        _, port = parse_endpoint(req.endpoint)
        network = parse_vpn_network(req.network)
        threshold = req.threshold_s if req.threshold_s is not None else settings.default_threshold_s
        lifetime = req.lifetime_s if req.lifetime_s is not None else settings.default_lifetime_s
        keepalive = req.keepalive_s if req.keepalive_s is not None else settings.default_keepalive_s
        self._check_timing(req.mfa_mode, threshold, lifetime, keepalive)
        allowed_ips = parse_networks(req.allowed_ips, "allowed IP")
        dns = parse_addresses(req.dns, "DNS server")
        wg_private, wg_public = generate_keypair()
        sealing_private, sealing_public = generate_keypair()
        location = Location(
            name=req.name,
            endpoint=req.endpoint.strip(),
            listen_port=port,
            network=str(network),
            gateway_address=gateway_address(network),
            wg_public_key=wg_public,
            wg_private_key_enc=self.ctx.vault.encrypt(wg_private),
            sealing_public_key=sealing_public,
            sealing_private_key_enc=self.ctx.vault.encrypt(sealing_private),
            mfa_mode=req.mfa_mode,
            peer_disconnect_threshold_s=threshold,
            session_lifetime_s=lifetime,
            keepalive_s=keepalive,
            allowed_ips=allowed_ips,
            dns=dns,
        )
        try:
            async with self.ctx.transaction() as session:
                await _check_provider_for(session, req.mfa_mode)
                await self._check_no_overlap(session, network, req.name)
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
                        actor=actor_of(req),
                    ),
                )
        except IntegrityError:
            raise RpcFailure(ErrorStatus.CONFLICT, f"location {req.name} already exists") from None
        return LocationAddResult(
            location=location_info(location),
            credentials_sealed=self._sealed_credentials(location, req.reply_key),
        )

    def _check_timing(self, mode: MfaMode, threshold: int, lifetime: int, keepalive: int) -> None:
        settings = self.ctx.settings
        floor = settings.threshold_floor_s
        if mode != MfaMode.DISABLED and threshold < floor:
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

    async def _check_no_overlap(self, session: AsyncSession, network: ipaddress._BaseNetwork, name: str) -> None:
        """Two locations sharing addresses would route one device's traffic to another."""
        others = (
            await session.exec(select(Location).where(col(Location.removed_at).is_(None), Location.name != name))
        ).all()
        for other in others:
            if network.overlaps(ipaddress.ip_network(other.network)):  # type: ignore[arg-type]
                raise _invalid(f"network {network} overlaps {other.network} of location {other.name}")

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
            locations = (
                await session.exec(select(Location).where(col(Location.removed_at).is_(None)).order_by(col(Location.id)))
            ).all()
        return LocationListResult(locations=[location_info(loc) for loc in locations])

    # --- users ----------------------------------------------------------------------------

    async def user_add(self, req: UserAddRequest) -> UserInfo:
        user = User(username=req.username, email=req.email)
        try:
            async with self.ctx.transaction() as session:
                session.add(user)
                await session.flush()
                enqueue_event(session, UserCreated(user_id=user.id, username=user.username, actor=actor_of(req)))  # type: ignore[arg-type]
        except IntegrityError:
            raise RpcFailure(ErrorStatus.CONFLICT, f"user {req.username} already exists") from None
        return user_info(user)

    async def user_list(self) -> UserListResult:
        async with self.ctx.db.reader() as session:
            users = (
                await session.exec(select(User).where(col(User.deleted_at).is_(None)).order_by(col(User.id)))
            ).all()
        return UserListResult(users=[user_info(u) for u in users])

    async def totp_enroll(self, req: TotpEnrollRequest) -> TotpEnrollResult:
        async with self.ctx.transaction() as session:
            user = await find_user(session, req.username)
            secret = factor_setup.begin_totp(self.ctx, session, user, actor=actor_of(req))
            try:
                sealed_uri = seal(req.reply_key, totp.provisioning_uri(secret, req.username, self.ctx.settings.totp_issuer))
            except SealError as exc:
                raise _invalid(f"reply_key: {exc}") from None
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
            if not factor_setup.confirm_totp(self.ctx, session, user, code, actor=actor_of(req)):
                raise RpcFailure(
                    ErrorStatus.UNAUTHENTICATED, "the code does not match the enrolled secret (check the device clock)"
                )
        return user_info(user)

    async def oidc_unlink(self, req: UserChangeRequest) -> UserInfo:
        """Forget the user's OpenID identity: the next OIDC login binds again (by verified email)."""
        async with self.ctx.transaction() as session:
            user = await find_user(session, req.username, lock=True)
            changes = {"oidc_identity": FieldChange(old=f"{user.oidc_subject} at {user.oidc_issuer}" if user.oidc_subject else None)}
            user.oidc_issuer = None
            user.oidc_subject = None
            session.add(user)
            enqueue_event(session, self._user_event("admin.oidc_unlinked", req, user, changes=changes))
        return user_info(user)

    async def email_mfa(self, req: EmailMfaRequest) -> UserInfo:
        async with self.ctx.transaction() as session:
            user = await find_user(session, req.username, lock=True)
            if user.email_mfa_enabled == req.enabled:
                return user_info(user)
            if not req.enabled:
                await self._check_factor_left(session, user, "email", force=req.force)
            factor_setup.set_email_mfa(session, user, req.enabled)
            enqueue_event(
                session,
                FactorChanged(
                    type="admin.email_mfa_changed", actor=actor_of(req), user_id=user.id, username=user.username,  # type: ignore[arg-type]
                    changes={"email_mfa_enabled": FieldChange(old=not req.enabled, new=req.enabled)},
                ),
            )
        return user_info(user)

    # --- devices --------------------------------------------------------------------------

    async def mobile_allow(self, req: MobileAllowRequest) -> MobileAllowResult:
        """Let the phone app of this device register its signing key, once, for a while,
        with the one-time code this returns (sealed): knowing the device's public key is
        not enough to register a phone."""
        if not is_key(req.reply_key):
            raise _invalid("reply_key must be an X25519 public key")
        code = new_mobile_code()
        async with self.ctx.transaction() as session:
            user = await find_user(session, req.username)
            device = await self._find_device(session, user, req.device_name)
            device.mobile_registration_until = self.ctx.clock.now() + timedelta(seconds=req.valid_s)
            device.mobile_registration_code_hash = mobile_code_hash(self.ctx, device, code)
            device.mobile_registration_failures = 0
            session.add(device)
            enqueue_event(
                session,
                FactorChanged(
                    type="admin.mobile_allowed", actor=actor_of(req), user_id=user.id, username=user.username,  # type: ignore[arg-type]
                    device_id=device.id, device_name=device.name,
                    changes={"mobile_registration_until": FieldChange(new=device.mobile_registration_until.isoformat())},
                ),
            )
        return MobileAllowResult(
            username=user.username, device_name=device.name, device_pubkey=device.pubkey,
            until=device.mobile_registration_until, code_sealed=seal(req.reply_key, code),
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
        placement = await place_device(self.ctx, session, location, device, user, actor=actor_of(req))
        return device_config(location, device, user, placement, self.ctx.vault.instance_id)

    async def device_list(self, req: DeviceListRequest) -> DeviceListResult:
        async with self.ctx.db.reader() as session:
            query = (
                select(LocationDevice, Location, Device, User)
                .join(Location, col(Location.id) == LocationDevice.location_id)
                .join(Device, col(Device.id) == LocationDevice.device_id)
                .join(User, col(User.id) == Device.user_id)
                .where(col(Device.removed_at).is_(None), col(Location.removed_at).is_(None))
                .order_by(col(Device.id), col(Location.id))
            )
            if req.username:
                query = query.where(User.username == req.username)
            rows = (await session.exec(query)).all()
        instance = self.ctx.vault.instance_id
        return DeviceListResult(devices=[device_config(loc, dev, usr, pl, instance) for pl, loc, dev, usr in rows])

    async def _find_device(self, session: AsyncSession, user: User, name: str) -> Device:
        device = (
            await session.exec(
                select(Device).where(Device.user_id == user.id, Device.name == name, col(Device.removed_at).is_(None))
            )
        ).first()
        if device is None:
            raise RpcFailure(ErrorStatus.NOT_FOUND, f"device {name} of {user.username} not found")
        return device

    async def device_rename(self, req: DeviceRenameRequest) -> DeviceChangeResult:
        try:
            async with self.ctx.transaction() as session:
                user = await find_user(session, req.username)
                device = await self._find_device(session, user, req.device_name)
                if req.new_name != device.name:
                    if (await session.exec(select(Device.id).where(Device.user_id == user.id, Device.name == req.new_name))).first():
                        raise RpcFailure(ErrorStatus.CONFLICT, f"{user.username} already has a device named {req.new_name}")
                    old_name, device.name = device.name, req.new_name
                    session.add(device)
                    enqueue_event(
                        session,
                        DeviceChanged(
                            type="admin.device_renamed", actor=actor_of(req), user_id=user.id, username=user.username,  # type: ignore[arg-type]
                            device_id=device.id, device_name=device.name,  # type: ignore[arg-type]
                            changes={"name": FieldChange(old=old_name, new=device.name)},
                        ),
                    )
        except IntegrityError:
            raise RpcFailure(ErrorStatus.CONFLICT, f"{req.username} already has a device named {req.new_name}") from None
        return DeviceChangeResult(username=user.username, device_id=device.id, device_name=device.name)  # type: ignore[arg-type]

    async def device_remove(self, req: DeviceRef) -> DeviceChangeResult:
        """The device leaves every location: its sessions end and its peers leave every
        gateway (one revoke per location, in this transaction). Its addresses are given back
        once those revokes are on the peer stream (DataPlane.on_peer_state)."""
        now = self.ctx.clock.now()
        async with self.ctx.transaction() as session:
            user = await find_user(session, req.username)
            device = await self._find_device(session, user, req.device_name)
            ended = peers = 0
            for placement, location in await self._placements_of_device(session, device):
                ended += await retract_peer(session, location, device, user, placement, RevokeReason.ADMIN, now)
                peers += 1
            await self._expire_logins(session, MfaLogin.device_id == device.id)
            enqueue_event(
                session,
                DeviceChanged(
                    type="admin.device_removed", actor=actor_of(req), user_id=user.id, username=user.username,  # type: ignore[arg-type]
                    device_id=device.id, device_name=device.name, sessions_revoked=ended,  # type: ignore[arg-type]
                    changes={"pubkey": FieldChange(old=device.pubkey)},
                ),
            )
            result = DeviceChangeResult(
                username=user.username, device_id=device.id, device_name=device.name,  # type: ignore[arg-type]
                sessions_revoked=ended, peers_removed=peers,
            )
            await self._tombstone_device(session, device, now)
        return result

    async def _placements_of_device(self, session: AsyncSession, device: Device) -> list[tuple[LocationDevice, Location]]:
        rows = (
            await session.exec(
                select(LocationDevice, Location)
                .join(Location, col(Location.id) == LocationDevice.location_id)
                .where(LocationDevice.device_id == device.id, col(Location.removed_at).is_(None))
                .order_by(col(Location.id))
                .with_for_update(of=LocationDevice)  # type: ignore[arg-type]
            )
        ).all()
        return list(rows)  # type: ignore[arg-type]

    async def _tombstone_device(self, session: AsyncSession, device: Device, now: datetime) -> None:
        """Keep the row (its id names peer subjects and must never be reused); give up its
        name and public key, so that they can be added again as a different device."""
        await session.exec(delete(MobileKey).where(col(MobileKey.device_id) == device.id))
        device.removed_at = now
        device.name = tombstone_name(device.name, device.id, "removed")
        device.pubkey = f"removed-{device.id}"
        device.mobile_registration_until = None
        session.add(device)

    async def _expire_logins(self, session: AsyncSession, *where: Any) -> None:
        """Close live logins that the change invalidates (an approved mobile login included)."""
        await session.exec(
            update(MfaLogin)
            .where(col(MfaLogin.state).in_(LIVE_LOGIN_STATES), *where)
            .values(state=LoginState.EXPIRED, challenge=None, email_code_hash=None)
        )

    # --- users: lifecycle ---------------------------------------------------------------------

    async def _placements_of_user(
        self, session: AsyncSession, user: User
    ) -> list[tuple[LocationDevice, Location, Device]]:
        rows = (
            await session.exec(
                select(LocationDevice, Location, Device)
                .join(Location, col(Location.id) == LocationDevice.location_id)
                .join(Device, col(Device.id) == LocationDevice.device_id)
                .where(Device.user_id == user.id, col(Device.removed_at).is_(None), col(Location.removed_at).is_(None))
                .order_by(col(Device.id), col(Location.id))
                .with_for_update(of=LocationDevice)  # type: ignore[arg-type]
            )
        ).all()
        return list(rows)  # type: ignore[arg-type]

    def _user_event(self, kind: str, req: object, user: User, **kw: Any) -> UserChanged:
        return UserChanged(type=kind, actor=actor_of(req), user_id=user.id, username=user.username, **kw)  # type: ignore[arg-type]

    async def user_disable(self, req: UserChangeRequest) -> UserChangeResult:
        """The user's sessions end and every peer of theirs leaves every gateway, in the
        same transaction as the change; later logins are refused."""
        now = self.ctx.clock.now()
        async with self.ctx.transaction() as session:
            user = await find_user(session, req.username, lock=True)
            if not user.is_active:
                raise RpcFailure(ErrorStatus.CONFLICT, f"user {user.username} is already disabled")
            user.is_active = False
            session.add(user)
            ended = peers = 0
            for placement, location, device in await self._placements_of_user(session, user):
                ended += await retract_peer(session, location, device, user, placement, RevokeReason.USER_DISABLED, now)
                peers += 1
            await self._expire_logins(session, MfaLogin.user_id == user.id)
            enqueue_event(
                session,
                self._user_event("admin.user_disabled", req, user, sessions_revoked=ended,
                                 changes={"is_active": FieldChange(old=True, new=False)}),
            )
        return UserChangeResult(user=user_info(user), sessions_revoked=ended, peers_removed=peers)

    async def user_enable(self, req: UserChangeRequest) -> UserChangeResult:
        """Logins work again; devices at locations without MFA are put back at once."""
        now = self.ctx.clock.now()
        async with self.ctx.transaction() as session:
            user = await find_user(session, req.username, lock=True)
            if user.is_active:
                raise RpcFailure(ErrorStatus.CONFLICT, f"user {user.username} is not disabled")
            user.is_active = True
            session.add(user)
            added = 0
            for placement, location, device in await self._placements_of_user(session, user):
                if location.mfa_mode == MfaMode.DISABLED and await reissue_peer(self.ctx, session, location, device, placement, now):
                    added += 1
            enqueue_event(
                session, self._user_event("admin.user_enabled", req, user, changes={"is_active": FieldChange(old=False, new=True)})
            )
        return UserChangeResult(user=user_info(user), peers_added=added)

    async def user_delete(self, req: UserChangeRequest) -> UserChangeResult:
        """Like disable, then the user and their devices become tombstones: the rows stay
        for the sessions and events that name them, under names no one can take, so a new
        user of the same name is a different user. Secrets and factors are dropped."""
        now = self.ctx.clock.now()
        async with self.ctx.transaction() as session:
            user = await find_user(session, req.username, lock=True)
            ended = peers = 0
            for placement, location, device in await self._placements_of_user(session, user):
                ended += await retract_peer(session, location, device, user, placement, RevokeReason.ADMIN, now)
                peers += 1
            await self._expire_logins(session, MfaLogin.user_id == user.id)
            enqueue_event(
                session,
                self._user_event("admin.user_deleted", req, user, sessions_revoked=ended,
                                 changes={"username": FieldChange(old=user.username)}),
            )
            result = UserChangeResult(user=user_info(user), sessions_revoked=ended, peers_removed=peers)
            devices = (
                await session.exec(select(Device).where(Device.user_id == user.id, col(Device.removed_at).is_(None)))
            ).all()
            for device in devices:
                await self._tombstone_device(session, device, now)
            await session.exec(delete(MobileKey).where(col(MobileKey.user_id) == user.id))
            user.username = tombstone_name(user.username, user.id, "deleted")
            user.deleted_at = now
            user.is_active = False
            user.totp_secret_enc = user.totp_pending_secret_enc = None
            user.email_mfa_enabled = False
            user.oidc_issuer = user.oidc_subject = None
            session.add(user)
        return result

    async def user_unlock(self, req: UserChangeRequest) -> UserChangeResult:
        async with self.ctx.transaction() as session:
            user = await find_user(session, req.username, lock=True)
            hard_locked, locked_until = await lockout_state(session, self.ctx, user)
            changes = {
                "failed_attempts": FieldChange(old=user.mfa_failures, new=0),
                "hard_locked": FieldChange(old=hard_locked, new=False),
                "addresses_locked_until": FieldChange(old=locked_until.isoformat() if locked_until else None),
            }
            await reset_failures(session, user.id)  # type: ignore[arg-type]
            await session.refresh(user)
            enqueue_event(session, self._user_event("admin.user_unlocked", req, user, changes=changes))
        return UserChangeResult(user=user_info(user))

    async def user_set(self, req: UserSetRequest) -> UserChangeResult:
        async with self.ctx.transaction() as session:
            user = await find_user(session, req.username, lock=True)
            changes = {}
            if req.email is not None and req.email != user.email:
                # Addresses are masked in the audit trail, as in mfa.email_sent.
                changes["email"] = FieldChange(old=masked_email(user.email), new=masked_email(req.email))
                user.email = req.email
            if not changes:
                raise _invalid("nothing to change: give --email")
            session.add(user)
            enqueue_event(session, self._user_event("admin.user_updated", req, user, changes=changes))
        return UserChangeResult(user=user_info(user))

    async def user_show(self, req: UserRef) -> UserDetail:
        async with self.ctx.db.reader() as session:
            user = await find_user(session, req.username)
            mobile = (
                await session.exec(
                    select(Device.name)
                    .join(MobileKey, col(MobileKey.device_id) == Device.id)
                    .where(MobileKey.user_id == user.id)
                    .order_by(col(Device.name))
                )
            ).all()
            hard_locked, locked_until = await lockout_state(session, self.ctx, user)
        devices = await self.device_list(DeviceListRequest(username=user.username))
        sessions = await self.sessions(SessionsRequest(username=user.username, include_revoked=False))
        return UserDetail(
            user=user_info(user),
            factors=UserFactors(
                totp=user.totp_secret_enc is not None,
                totp_pending=user.totp_pending_secret_enc is not None,
                email=user.email_mfa_enabled,
                mobile_keys=list(mobile),
            ),
            devices=devices.devices,
            sessions=sessions.sessions,
            failed_attempts=user.mfa_failures,
            hard_locked=hard_locked,
            locked_until=locked_until,
            oidc_issuer=user.oidc_issuer,
            oidc_subject=user.oidc_subject,
        )

    # --- factors --------------------------------------------------------------------------------

    async def _check_factor_left(
        self, session: AsyncSession, user: User, removing: str, *, device_id: int | None = None, force: bool
    ) -> None:
        """Refuse (unless forced) to take away a user's last second factor while they have
        devices at a location that requires one: they could not connect there any more."""
        left = []
        if removing != "totp" and user.totp_secret_enc is not None:
            left.append("totp")
        if removing != "email" and user.email_mfa_enabled:
            left.append("email")
        keys = (await session.exec(select(MobileKey.device_id).where(MobileKey.user_id == user.id))).all()
        if any(key != device_id for key in keys):  # device_id: the key being removed, if any
            left.append("mobile")
        if left or force:
            return
        locations = (
            await session.exec(
                select(Location.name)
                .join(LocationDevice, col(LocationDevice.location_id) == Location.id)
                .join(Device, col(Device.id) == LocationDevice.device_id)
                .where(
                    Device.user_id == user.id,
                    col(Device.removed_at).is_(None),
                    col(Location.removed_at).is_(None),
                    Location.mfa_mode == MfaMode.INTERNAL,
                )
                .distinct()
            )
        ).all()
        if locations:
            raise RpcFailure(
                ErrorStatus.FAILED_PRECONDITION,
                f"{removing} is the last second factor of {user.username}, who has devices at MFA location(s) "
                f"{', '.join(sorted(locations))}: they could not connect there any more; "
                "pass --force to remove it anyway",
            )

    async def totp_reset(self, req: FactorRemoveRequest) -> UserInfo:
        """Drop the user's TOTP (active and pending); `totp enroll` sets up a new one."""
        async with self.ctx.transaction() as session:
            user = await find_user(session, req.username, lock=True)
            if user.totp_secret_enc is None and user.totp_pending_secret_enc is None:
                raise RpcFailure(ErrorStatus.CONFLICT, f"{user.username} has no TOTP set up")
            if user.totp_secret_enc is not None:
                await self._check_factor_left(session, user, "totp", force=req.force)
            old = "active" if user.totp_secret_enc is not None else "pending"
            user.totp_secret_enc = user.totp_pending_secret_enc = None
            session.add(user)
            await self._expire_logins(session, MfaLogin.user_id == user.id, MfaLogin.method == "totp")
            enqueue_event(
                session,
                FactorChanged(
                    type="admin.totp_reset", actor=actor_of(req), user_id=user.id, username=user.username,  # type: ignore[arg-type]
                    changes={"totp": FieldChange(old=old, new=None)},
                ),
            )
        return user_info(user)

    async def mobile_remove(self, req: MobileRemoveRequest) -> DeviceChangeResult:
        """Forget the signing key a device's phone app registered (biometric and mobile
        approve stop working with it); the device itself stays."""
        async with self.ctx.transaction() as session:
            user = await find_user(session, req.username, lock=True)
            device = await self._find_device(session, user, req.device_name)
            key = (await session.exec(select(MobileKey).where(MobileKey.device_id == device.id))).first()
            if key is None:
                raise RpcFailure(ErrorStatus.NOT_FOUND, f"device {device.name} of {user.username} has no mobile key")
            await self._check_factor_left(session, user, "mobile", device_id=device.id, force=req.force)
            await session.delete(key)
            await self._expire_logins(
                session, MfaLogin.user_id == user.id, col(MfaLogin.method).in_(("biometric", "mobile_approve"))
            )
            enqueue_event(
                session,
                FactorChanged(
                    type="admin.mobile_key_removed", actor=actor_of(req), user_id=user.id, username=user.username,  # type: ignore[arg-type]
                    device_id=device.id, device_name=device.name,
                ),
            )
        return DeviceChangeResult(username=user.username, device_id=device.id, device_name=device.name)  # type: ignore[arg-type]

    # --- locations: changes -----------------------------------------------------------------------

    async def _placements_at(self, session: AsyncSession, location: Location) -> list[tuple[LocationDevice, Device, User]]:
        rows = (
            await session.exec(
                select(LocationDevice, Device, User)
                .join(Device, col(Device.id) == LocationDevice.device_id)
                .join(User, col(User.id) == Device.user_id)
                .where(LocationDevice.location_id == location.id, col(Device.removed_at).is_(None))
                .order_by(col(Device.id))
                .with_for_update(of=LocationDevice)  # type: ignore[arg-type]
            )
        ).all()
        return list(rows)  # type: ignore[arg-type]

    async def location_set(self, req: LocationSetRequest) -> LocationChangeResult:
        """Change a location. Its devices follow at once, in the same transaction: from no
        MFA to MFA every peer leaves (devices need MFA to come back); from MFA to none every
        device is put on without PSK (live sessions end); a new threshold, keepalive or
        routed networks re-issue the live peers (same PSK, next generation); a new network
        renumbers every device and issues its peer anew (with MFA: after MFA again)."""
        now = self.ctx.clock.now()
        async with self.ctx.transaction() as session:
            location = await find_location(session, req.location, lock=True)
            new: dict[str, Any] = {}
            if req.mfa_mode is not None:
                new["mfa_mode"] = MfaMode(req.mfa_mode).value
            if req.threshold_s is not None:
                new["peer_disconnect_threshold_s"] = req.threshold_s
            if req.lifetime_s is not None:
                new["session_lifetime_s"] = req.lifetime_s
            if req.keepalive_s is not None:
                new["keepalive_s"] = req.keepalive_s
            if req.network is not None:
                network = parse_vpn_network(req.network)
                if str(network) != location.network:
                    await self._check_no_overlap(session, network, location.name)
                    new["network"] = str(network)
                    new["gateway_address"] = gateway_address(network)
            if req.endpoint is not None:
                _, port = parse_endpoint(req.endpoint)
                new["endpoint"] = req.endpoint.strip()
                new["listen_port"] = port
            if req.allowed_ips is not None:
                new["allowed_ips"] = parse_networks(req.allowed_ips, "allowed IP")
            if req.dns is not None:
                new["dns"] = parse_addresses(req.dns, "DNS server")
            changes = {key: [getattr(location, key), value] for key, value in new.items() if getattr(location, key) != value}
            mode = MfaMode(new.get("mfa_mode", location.mfa_mode))
            if "mfa_mode" in changes:
                await _check_provider_for(session, mode)
            self._check_timing(
                mode,
                new.get("peer_disconnect_threshold_s", location.peer_disconnect_threshold_s),
                new.get("session_lifetime_s", location.session_lifetime_s),
                new.get("keepalive_s", location.keepalive_s),
            )
            if not changes:
                return LocationChangeResult(location=location_info(location), changes={})
            old_mode = MfaMode(location.mfa_mode)
            for key, (_, value) in changes.items():
                setattr(location, key, value)
            session.add(location)
            ended = reissued = removed = 0
            reissue = bool({"peer_disconnect_threshold_s", "keepalive_s", "allowed_ips"} & changes.keys())
            placements = await self._placements_at(session, location)
            if "network" in changes:
                await self._renumber(session, location, [placement for placement, _, _ in placements])
            renumbered = "network" in changes
            for placement, device, user in placements:
                if mode != MfaMode.DISABLED and (renumbered or old_mode == MfaMode.DISABLED):
                    # unauthenticated peers leave; after a new network the client's tunnel has
                    # the old address: it needs its new config and MFA again
                    ended += await retract_peer(session, location, device, user, placement, RevokeReason.ADMIN, now)
                    removed += 1
                elif mode == MfaMode.DISABLED and (renumbered or old_mode != MfaMode.DISABLED):
                    for live in await live_sessions(session, location.id, device.id):  # type: ignore[arg-type]
                        await revoke(session, live, location, device, user, RevokeReason.ADMIN, now, publish_peer=False)
                        ended += 1
                    if user.is_active:  # a disabled user's devices stay off
                        reissued += await reissue_peer(self.ctx, session, location, device, placement, now)
                elif reissue and user.is_active:
                    reissued += await reissue_peer(self.ctx, session, location, device, placement, now)
            enqueue_event(
                session,
                LocationChanged(
                    type="admin.location_changed", actor=actor_of(req), location_id=location.id,  # type: ignore[arg-type]
                    location_name=location.name, sessions_revoked=ended, peers_reissued=reissued, peers_removed=removed,
                    changes={key: FieldChange(old=old, new=value) for key, (old, value) in changes.items()},
                ),
            )
        return LocationChangeResult(
            location=location_info(location), changes=changes, peers_reissued=reissued, peers_removed=removed,
            sessions_revoked=ended,
        )

    async def _renumber(self, session: AsyncSession, location: Location, placements: list[LocationDevice]) -> None:
        """Give every device an address in the location's new network, in device order. The
        addresses of removed devices not given back yet stay taken."""
        network = ipaddress.ip_network(location.network)
        moving = {(p.location_id, p.device_id) for p in placements}
        taken = {
            address
            for address, device_id in (
                await session.exec(
                    select(LocationDevice.address, LocationDevice.device_id).where(LocationDevice.location_id == location.id)
                )
            ).all()
            if (location.id, device_id) not in moving
        }
        taken.add(location.gateway_address.split("/")[0])
        free = (str(host) for host in network.hosts() if str(host) not in taken)
        addresses = [address for address, _ in zip(free, placements)]
        if len(addresses) < len(placements):
            raise _invalid(f"network {network} has no room for the {len(placements)} devices of location {location.name}")
        # Two steps, so that no address is held twice on the way (the networks may overlap).
        for placement in placements:
            placement.address = f"moving-{placement.device_id}"
            session.add(placement)
        await session.flush()
        for placement, address in zip(placements, addresses):
            placement.address = address
            session.add(placement)
        await session.flush()

    async def location_remove(self, req: LocationRemoveRequest) -> LocationChangeResult:
        """Every device leaves the location's gateways; the location becomes a tombstone
        (its id names peer subjects and is never reused; its name and network are free)."""
        now = self.ctx.clock.now()
        async with self.ctx.transaction() as session:
            location = await find_location(session, req.location, lock=True)
            ended = removed = 0
            for placement, device, user in await self._placements_at(session, location):
                ended += await retract_peer(session, location, device, user, placement, RevokeReason.ADMIN, now)
                removed += 1
            await self._expire_logins(session, MfaLogin.location_id == location.id)
            enqueue_event(
                session,
                LocationChanged(
                    type="admin.location_removed", actor=actor_of(req), location_id=location.id,  # type: ignore[arg-type]
                    location_name=location.name, sessions_revoked=ended, peers_removed=removed,
                    changes={"name": FieldChange(old=location.name)},
                ),
            )
            result = LocationChangeResult(
                location=location_info(location), changes={"removed": [False, True]}, peers_removed=removed,
                sessions_revoked=ended,
            )
            location.name = tombstone_name(location.name, location.id, "removed")
            location.removed_at = now
            session.add(location)
        return result

    # --- sessions -------------------------------------------------------------------------

    async def sessions(self, req: SessionsRequest) -> SessionsResult:
        """Sessions, newest first; live ones with what the gateways last saw of their peer."""
        now = self.ctx.clock.now()
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
            if req.username:
                query = query.where(User.username == req.username, col(User.deleted_at).is_(None))
            if not req.include_revoked:
                query = query.where(col(VpnSession.state).in_(LIVE_SESSION_STATES))
            rows = (await session.exec(query)).all()
            live = [(loc.id, dev.pubkey) for vs, loc, dev, _ in rows if vs.state in LIVE_SESSION_STATES]
            samples: dict[tuple[int, str], list[PeerStat]] = {}
            if live:
                found = (
                    await session.exec(
                        select(PeerStat).where(
                            col(PeerStat.location_id).in_({loc for loc, _ in live}),
                            col(PeerStat.pubkey).in_({key for _, key in live}),
                        )
                    )
                ).all()
                for stat in found:
                    samples.setdefault((stat.location_id, stat.pubkey), []).append(stat)
        return SessionsResult(sessions=[self._live_view(row, samples, now) for row in rows])

    def _live_view(
        self,
        row: tuple[VpnSession, Location, Device, User],
        samples: dict[tuple[int, str], list[PeerStat]],
        now: datetime,
    ) -> SessionInfo:
        vpn_session, location, device, user = row
        info = session_info(vpn_session, location, device, user)
        if vpn_session.state not in LIVE_SESSION_STATES:
            return info
        info.expires_in_s = max(0, int((vpn_session.expires_at - now).total_seconds()))
        # The gateway with the freshest handshake speaks for the peer; a handshake from
        # before this session's authorization belongs to an earlier one.
        since = vpn_session.authorized_at - HANDSHAKE_SLACK
        stats = sorted(
            samples.get((location.id, device.pubkey), []),  # type: ignore[arg-type]
            key=lambda s: (s.handshake_at is not None and s.handshake_at >= since, s.handshake_at or s.sampled_at, s.sampled_at),
        )
        handshake_at = None
        if stats:
            best = stats[-1]
            info.gateway_id, info.endpoint = best.gateway_id, best.endpoint
            info.rx_bytes, info.tx_bytes = best.rx_bytes, best.tx_bytes
            info.sampled_age_s = max(0, int((now - best.sampled_at).total_seconds()))
            if best.handshake_at is not None and best.handshake_at >= since:
                handshake_at = best.handshake_at
                info.handshake_age_s = max(0, int((now - handshake_at).total_seconds()))
        info.idle_deadline = (handshake_at or vpn_session.authorized_at) + timedelta(
            seconds=location.peer_disconnect_threshold_s
        )
        return info

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
            enqueue_event(
                session,
                DeviceChanged(
                    type="admin.session_revoked", actor=actor_of(req), user_id=user.id, username=user.username,  # type: ignore[arg-type]
                    device_id=device.id, device_name=device.name, session_id=vpn_session.id, sessions_revoked=1,  # type: ignore[arg-type]
                ),
            )
        return session_info(vpn_session, location, device, user)
