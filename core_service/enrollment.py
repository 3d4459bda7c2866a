"""Enrollment of Defguard's desktop and mobile apps: an admin's single-use token opens a
session (carried by the app's sealed cookie), the user sets up a second factor
themselves, the app creates its device and receives every location it may reach; then
it polls its configuration with a per-device polling token.

Wire behaviour follows Defguard's core (strings included), see docs/http.md and docs/guide.md.
"""
from __future__ import annotations

import hmac
import json
import logging
import secrets
from datetime import datetime, timedelta
from uuid import UUID

from sqlalchemy.exc import IntegrityError
from sqlmodel import col, delete, select, update
from sqlmodel.ext.asyncio.session import AsyncSession

from core_service import factor_setup
from core_service.admin import client_allowed_ips, mobile_code_hash, place_device
from core_service.context import CoreContext
from core_service.factors.base import token_hash
from core_service.keys import ENROLLMENT_COOKIE, new_token
from core_service.mailer import MailError, Mailer
from core_service.models import Device, Enrollment, Location, LocationDevice, MobileKey, PollingToken, User
from core_service.outbox import enqueue_event
from core_service.sessions import find_user
from schemas.sealing import SealError, is_key, seal
from schemas.common import MfaMethod, MfaMode, uuid7
from schemas.events import (
    EnrollmentDeviceCreated,
    EnrollmentFailed,
    EnrollmentIssued,
    EnrollmentRevoked,
    EnrollmentStarted,
    MobileKeyRegistered,
)
from schemas.rpc import (
    AppDevice,
    AppDeviceConfigResult,
    AppLocationConfig,
    ClientInfo,
    Empty,
    EnrollCreateDeviceRequest,
    EnrollCreateRequest,
    EnrollCreateResult,
    EnrollFactorFinishRequest,
    EnrollFactorStartRequest,
    EnrollFactorStartResult,
    EnrollListRequest,
    EnrollListResult,
    EnrollmentInfo,
    EnrollNetworkInfoRequest,
    EnrollRevokeRequest,
    EnrollRevokeResult,
    EnrollSession,
    EnrollStartRequest,
    EnrollStartResult,
    EnrollUser,
    ErrorStatus,
    PollRequest,
    RegisterMobileRequest,
    RpcFailure,
    actor_of,
)

log = logging.getLogger(__name__)

TOKEN_BITS = 192  # enrollment and polling tokens alike
ENROLLMENT_RETENTION = timedelta(days=30)

INVALID_TOKEN = "invalid token"
TOKEN_EXPIRED = "token expired"  # the desktop app shows its own "token expired" message for it
MISSING_COOKIE = "Missing authorization header"
SESSION_EXPIRED = "Session expired"
USER_DISABLED = "user is disabled"
INVALID_PUBKEY = "invalid pubkey"
PUBKEY_TAKEN = "invalid key"
DEVICE_NOT_FOUND = "device not found"
METHOD_NOT_SUPPORTED = "Method not supported."
ALREADY_CONFIGURED = "MFA already configured"
NO_SETUP = "MFA setup not started"
INVALID_CODE = "invalid code"
EMAIL_UNAVAILABLE = "email MFA is not available: the server has no SMTP configured"
NO_TOKEN = "No token present"
INVALID_AUTH_KEY = "Invalid biometric public key."
INVALID_DEVICE_KEY = "Invalid device public key."
MOBILE_NOT_ALLOWED = (
    "mobile registration is not allowed for this device; an administrator allows it with "
    "`wgmfa admin mobile allow USER DEVICE`, which prints the code to register with"
)
WRONG_MOBILE_CODE = "invalid registration code"

_MODE_NUMBER = {MfaMode.DISABLED: 1, MfaMode.INTERNAL: 2, MfaMode.EXTERNAL: 3}


def app_location_config(location: Location, placement: LocationDevice) -> AppLocationConfig:
    """One location as Defguard's apps read it. Everything the apps follow through
    `/poll` is derived here, from the location's row, and nowhere else."""
    mode = MfaMode(location.mfa_mode)
    allowed = ",".join(client_allowed_ips(location))
    dns = ",".join(location.dns) or None
    address = placement.address.split("/")[0]
    config = (
        "[Interface]\n"
        "PrivateKey = YOUR_PRIVATE_KEY\n"
        f"Address = {address}\n"
        + (f"DNS = {dns}\n" if dns else "")
        + "\n"
        "[Peer]\n"
        f"PublicKey = {location.wg_public_key}\n"
        f"AllowedIPs = {allowed}\n"
        f"Endpoint = {location.endpoint}\n"
        f"PersistentKeepalive = {location.keepalive_s}\n"
    )
    return AppLocationConfig(
        network_id=location.id,  # type: ignore[arg-type]
        network_name=location.name,
        config=config,
        endpoint=location.endpoint,
        assigned_ip=address,
        pubkey=location.wg_public_key,
        allowed_ips=allowed,
        dns=dns,
        mfa_enabled=mode == MfaMode.INTERNAL,
        keepalive_interval=location.keepalive_s,
        location_mfa_mode=_MODE_NUMBER[mode],
    )


def enrollment_info(enrollment: Enrollment, user: User, now: datetime) -> EnrollmentInfo:
    if enrollment.revoked_at is not None:
        state = "revoked"
    elif enrollment.started_at is not None:
        state = "started" if enrollment.session_deadline and enrollment.session_deadline > now else "finished"
    else:
        state = "open" if enrollment.expires_at > now else "expired"
    return EnrollmentInfo(
        id=str(enrollment.id),
        username=user.username,
        device_name=enrollment.device_name,
        created_at=enrollment.created_at,
        expires_at=enrollment.expires_at,
        started_at=enrollment.started_at,
        session_deadline=enrollment.session_deadline,
        state=state,
    )


class _Refusal(Exception):
    """A refused step: answered with `status`/`message`, audited as enrollment.failed.
    Ids are copied at once: the rows expire when the transaction rolls back."""

    def __init__(
        self, status: ErrorStatus, message: str, reason: str, enrollment: Enrollment | None = None,
        user: User | None = None,
    ) -> None:
        super().__init__(reason)
        self.status, self.message, self.reason = status, message, reason
        self.enrollment_id = enrollment.id if enrollment else None
        self.user_id = user.id if user else None
        self.username = user.username if user else None


class Enrollments:
    def __init__(self, ctx: CoreContext, mailer: Mailer | None = None) -> None:
        self.ctx = ctx
        self.mailer = mailer

    # --- admin --------------------------------------------------------------------------

    async def create(self, req: EnrollCreateRequest) -> EnrollCreateResult:
        if not is_key(req.reply_key):
            raise RpcFailure(ErrorStatus.INVALID_ARGUMENT, "reply_key must be an X25519 public key")
        token = new_token(TOKEN_BITS)
        now = self.ctx.clock.now()
        async with self.ctx.transaction() as session:
            user = await find_user(session, req.username)
            if not user.is_active:
                raise RpcFailure(ErrorStatus.INVALID_ARGUMENT, f"user {user.username} is disabled")
            enrollment = Enrollment(
                id=uuid7(),
                token_hash=token_hash(token),
                user_id=user.id,  # type: ignore[arg-type]
                device_name=req.device_name,
                created_at=now,
                expires_at=now + timedelta(seconds=req.ttl_s),
            )
            session.add(enrollment)
            enqueue_event(
                session,
                EnrollmentIssued(enrollment_id=enrollment.id, user_id=user.id, username=user.username,  # type: ignore[arg-type]
                                 expires_at=enrollment.expires_at, actor=actor_of(req)),
            )
        return EnrollCreateResult(enrollment=enrollment_info(enrollment, user, now), token_sealed=seal(req.reply_key, token))

    async def list(self, req: EnrollListRequest) -> EnrollListResult:
        now = self.ctx.clock.now()
        async with self.ctx.db.reader() as session:
            rows = (
                await session.exec(
                    select(Enrollment, User).join(User, col(User.id) == Enrollment.user_id).order_by(col(Enrollment.created_at))
                )
            ).all()
        infos = [enrollment_info(e, u, now) for e, u in rows]
        if not req.include_closed:
            infos = [i for i in infos if i.state in ("open", "started")]
        return EnrollListResult(enrollments=infos)

    async def revoke(self, req: EnrollRevokeRequest) -> EnrollRevokeResult:
        """Cancel an open token (or a running session): by id, or all of a user's."""
        now = self.ctx.clock.now()
        async with self.ctx.transaction() as session:
            query = select(Enrollment, User).join(User, col(User.id) == Enrollment.user_id).where(
                col(Enrollment.revoked_at).is_(None)
            )
            try:
                query = query.where(Enrollment.id == UUID(req.enrollment))
            except ValueError:
                query = query.where(User.username == req.enrollment)
            rows = [
                (e, u) for e, u in (await session.exec(query)).all()
                if enrollment_info(e, u, now).state in ("open", "started")
            ]
            if not rows:
                raise RpcFailure(ErrorStatus.NOT_FOUND, f"no open enrollment {req.enrollment}")
            for enrollment, user in rows:
                enrollment.revoked_at = now
                enrollment.email_code_hash = None
                session.add(enrollment)
                enqueue_event(session, EnrollmentRevoked(enrollment_id=enrollment.id, user_id=user.id,  # type: ignore[arg-type]
                                                         username=user.username, actor=actor_of(req)))
        return EnrollRevokeResult(revoked=[enrollment_info(e, u, now) for e, u in rows])

    # --- failures -----------------------------------------------------------------------

    async def _refused(self, step: str, refusal: _Refusal, client: ClientInfo) -> RpcFailure:
        async with self.ctx.transaction() as session:
            enqueue_event(
                session,
                EnrollmentFailed(
                    step=step,
                    reason=refusal.reason,
                    enrollment_id=refusal.enrollment_id,
                    user_id=refusal.user_id,
                    username=refusal.username,
                    client_ip=client.ip,
                ),
            )
        log.info("enrollment step %s refused: %s", step, refusal.reason)
        return RpcFailure(refusal.status, refusal.message)

    def _open(self, sealed: str, what: str) -> str:
        try:
            return self.ctx.vault.open_sealed(sealed)
        except SealError:
            raise RpcFailure(ErrorStatus.INVALID_ARGUMENT, f"{what} is not sealed to this core") from None

    # --- start --------------------------------------------------------------------------

    async def start(self, req: EnrollStartRequest) -> EnrollStartResult:
        if not is_key(req.reply_key):
            raise RpcFailure(ErrorStatus.INVALID_ARGUMENT, "reply_key must be an X25519 public key")
        token = self._open(req.token_sealed, "token_sealed")
        now = self.ctx.clock.now()
        try:
            async with self.ctx.transaction() as session:
                enrollment = (
                    await session.exec(
                        select(Enrollment).where(Enrollment.token_hash == token_hash(token)).with_for_update()
                    )
                ).first()
                if enrollment is None:
                    raise _Refusal(ErrorStatus.UNAUTHENTICATED, INVALID_TOKEN, "unknown_token")
                user = await session.get(User, enrollment.user_id)
                assert user is not None
                if enrollment.revoked_at is not None:
                    raise _Refusal(ErrorStatus.UNAUTHENTICATED, INVALID_TOKEN, "revoked_token", enrollment, user)
                if enrollment.started_at is not None:
                    raise _Refusal(ErrorStatus.UNAUTHENTICATED, INVALID_TOKEN, "reused_token", enrollment, user)
                if enrollment.expires_at <= now:
                    raise _Refusal(ErrorStatus.UNAUTHENTICATED, TOKEN_EXPIRED, "expired_token", enrollment, user)
                if not user.is_active:
                    raise _Refusal(ErrorStatus.PERMISSION_DENIED, USER_DISABLED, "user_disabled", enrollment, user)
                # The token is spent now; the session lives on in the cookie until its deadline.
                claimed = await session.exec(
                    update(Enrollment)
                    .where(col(Enrollment.id) == enrollment.id, col(Enrollment.started_at).is_(None))
                    .values(started_at=now, session_deadline=now + timedelta(seconds=self.ctx.settings.enrollment_session_s))
                )
                if claimed.rowcount != 1:
                    raise _Refusal(ErrorStatus.UNAUTHENTICATED, INVALID_TOKEN, "reused_token", enrollment, user)
                deadline = now + timedelta(seconds=self.ctx.settings.enrollment_session_s)
                enqueue_event(
                    session,
                    EnrollmentStarted(enrollment_id=enrollment.id, user_id=user.id, username=user.username,  # type: ignore[arg-type]
                                      session_deadline=deadline, client_ip=req.client.ip),
                )
                device_names = list(
                    (await session.exec(select(Device.name).where(Device.user_id == user.id).order_by(col(Device.id)))).all()
                )
        except _Refusal as refusal:
            raise await self._refused("start", refusal, req.client) from None
        cookie = self.ctx.vault.seal_cookie(ENROLLMENT_COOKIE, json.dumps({"e": str(enrollment.id), "d": int(deadline.timestamp())}))
        return EnrollStartResult(
            cookie_sealed=seal(req.reply_key, cookie),
            deadline=deadline,
            user=EnrollUser(
                username=user.username,
                email=user.email,
                is_active=user.is_active,
                enrolled=factor_setup.has_factor(user),
                device_names=device_names,
            ),
            instance_id=self.ctx.vault.instance_id,
            instance_name=self.ctx.settings.instance_name,
            smtp_configured=self.mailer is not None,
        )

    async def _session(self, session: AsyncSession, req: EnrollSession, *, lock: bool = False) -> tuple[Enrollment, User]:
        """The enrollment and user of the request's cookie, if its session is live."""
        if req.cookie_sealed is None:
            raise _Refusal(ErrorStatus.UNAUTHENTICATED, MISSING_COOKIE, "no_cookie")
        cookie = self._open(req.cookie_sealed, "cookie_sealed")
        content = self.ctx.vault.open_cookie(ENROLLMENT_COOKIE, cookie)
        try:
            enrollment_id = UUID(json.loads(content)["e"]) if content else None
        except (ValueError, KeyError, TypeError):
            enrollment_id = None
        if enrollment_id is None:
            raise _Refusal(ErrorStatus.UNAUTHENTICATED, INVALID_TOKEN, "forged_cookie")
        query = select(Enrollment).where(Enrollment.id == enrollment_id)
        enrollment = (await session.exec(query.with_for_update() if lock else query)).first()
        if enrollment is None:
            raise _Refusal(ErrorStatus.UNAUTHENTICATED, INVALID_TOKEN, "unknown_session")
        user = await session.get(User, enrollment.user_id)
        assert user is not None
        if enrollment.revoked_at is not None:
            raise _Refusal(ErrorStatus.UNAUTHENTICATED, INVALID_TOKEN, "revoked_session", enrollment, user)
        if enrollment.session_deadline is None or enrollment.session_deadline <= self.ctx.clock.now():
            raise _Refusal(ErrorStatus.UNAUTHENTICATED, SESSION_EXPIRED, "session_expired", enrollment, user)
        if not user.is_active:
            raise _Refusal(ErrorStatus.PERMISSION_DENIED, USER_DISABLED, "user_disabled", enrollment, user)
        return enrollment, user

    # --- the user's own second factor ---------------------------------------------------

    async def factor_start(self, req: EnrollFactorStartRequest) -> EnrollFactorStartResult:
        """TOTP: a new secret, shown only to the user's app. Email: a code mailed to the
        user's address. Only for a user without a factor: a session cannot replace one."""
        if not is_key(req.reply_key):
            raise RpcFailure(ErrorStatus.INVALID_ARGUMENT, "reply_key must be an X25519 public key")
        code = None
        try:
            async with self.ctx.transaction() as session:
                enrollment, user = await self._session(session, req, lock=True)
                if req.method not in (MfaMethod.TOTP, MfaMethod.EMAIL):
                    raise _Refusal(ErrorStatus.INVALID_ARGUMENT, METHOD_NOT_SUPPORTED, "method_not_supported", enrollment, user)
                if factor_setup.has_factor(user):
                    raise _Refusal(ErrorStatus.INVALID_ARGUMENT, ALREADY_CONFIGURED, "already_configured", enrollment, user)
                enrollment.setup_failures = 0
                if req.method == MfaMethod.TOTP:
                    secret = factor_setup.begin_totp(self.ctx, session, user)
                    enrollment.setup_method = "totp"
                    enrollment.email_code_hash = None
                    session.add(enrollment)
                    return EnrollFactorStartResult(totp_secret_sealed=seal(req.reply_key, secret))
                if self.mailer is None:
                    raise _Refusal(ErrorStatus.INVALID_ARGUMENT, EMAIL_UNAVAILABLE, "email_unavailable", enrollment, user)
                if enrollment.email_codes_sent >= self.ctx.settings.email_per_user_limit:
                    raise _Refusal(ErrorStatus.RATE_LIMITED, "too many MFA emails; try again later", "email_throttled",
                                   enrollment, user)
                code = f"{secrets.randbelow(10**6):06d}"
                enrollment.setup_method = "email"
                enrollment.email_code_hash = self.ctx.vault.code_hash(enrollment.id, code)
                enrollment.email_codes_sent += 1
                session.add(enrollment)
        except _Refusal as refusal:
            raise await self._refused("factor_start", refusal, req.client) from None
        try:
            await self.mailer.send(  # type: ignore[union-attr]
                user.email,
                "Your wgmfa code to set up email sign-in",
                f"Hello {user.username},\n\nyour code to set up sign-in codes by email: {code}\n\n"
                f"It works once, during this enrollment. If you did not ask for it, tell your administrator.\n",
            )
        except MailError as exc:
            async with self.ctx.transaction() as session:
                await session.exec(update(Enrollment).where(col(Enrollment.id) == enrollment.id).values(email_code_hash=None))
            raise RpcFailure(ErrorStatus.UNAVAILABLE, f"cannot send the MFA email: {exc}") from None
        return EnrollFactorStartResult()

    async def factor_finish(self, req: EnrollFactorFinishRequest) -> Empty:
        """Prove the new factor with a code: the attempt is counted before the check, and
        after max_failed_attempts wrong codes the setup must start over."""
        code = self._open(req.code_sealed, "code_sealed").strip()
        wrong = False
        try:
            async with self.ctx.transaction() as session:
                enrollment, user = await self._session(session, req, lock=True)
                if enrollment.setup_method is None:
                    raise _Refusal(ErrorStatus.INVALID_ARGUMENT, NO_SETUP, "no_setup", enrollment, user)
                enrollment.setup_failures += 1
                if enrollment.setup_method == "totp":
                    ok = user.totp_pending_secret_enc is not None and factor_setup.confirm_totp(self.ctx, session, user, code)
                else:
                    expected = enrollment.email_code_hash or ""
                    ok = bool(expected) and hmac.compare_digest(expected, self.ctx.vault.code_hash(enrollment.id, code))
                    if ok:
                        factor_setup.set_email_mfa(session, user, True)
                if ok:
                    enrollment.setup_method = None
                    enrollment.email_code_hash = None
                    enrollment.setup_failures = 0
                else:
                    wrong = True
                    if enrollment.setup_failures >= self.ctx.settings.max_failed_attempts:
                        enrollment.setup_method = None
                        enrollment.email_code_hash = None
                        user.totp_pending_secret_enc = None
                        session.add(user)
                session.add(enrollment)
        except _Refusal as refusal:
            raise await self._refused("factor_finish", refusal, req.client) from None
        if wrong:
            raise await self._refused(
                "factor_finish", _Refusal(ErrorStatus.UNAUTHENTICATED, INVALID_CODE, "wrong_code", enrollment, user), req.client
            )
        return Empty()

    async def activate(self, req: EnrollSession) -> Empty:
        """The desktop's last step (it sends a password wgmfa has no use for): nothing to
        store, but the session must still be live."""
        try:
            async with self.ctx.db.reader() as session:
                await self._session(session, req)
        except _Refusal as refusal:
            raise await self._refused("activate", refusal, req.client) from None
        return Empty()

    # --- devices and their configuration ------------------------------------------------

    async def create_device(self, req: EnrollCreateDeviceRequest) -> AppDeviceConfigResult:
        if not is_key(req.reply_key):
            raise RpcFailure(ErrorStatus.INVALID_ARGUMENT, "reply_key must be an X25519 public key")
        try:
            try:
                async with self.ctx.transaction() as session:
                    enrollment, user = await self._session(session, req, lock=True)
                    name = enrollment.device_name or req.name.strip()  # the admin's choice, if any, wins
                    if not is_key(req.pubkey):
                        raise _Refusal(ErrorStatus.INVALID_ARGUMENT, INVALID_PUBKEY, "invalid_pubkey", enrollment, user)
                    if not 1 <= len(name) <= 64:
                        raise _Refusal(ErrorStatus.INVALID_ARGUMENT, "invalid device name: 1 to 64 characters",
                                       "invalid_name", enrollment, user)
                    if (await session.exec(select(Device.id).where(Device.pubkey == req.pubkey))).first() is not None:
                        raise _Refusal(ErrorStatus.INVALID_ARGUMENT, PUBKEY_TAKEN, "pubkey_taken", enrollment, user)
                    if (await session.exec(select(Device.id).where(Device.user_id == user.id, Device.name == name))).first():
                        raise _Refusal(ErrorStatus.INVALID_ARGUMENT, f"a device named {name} already exists",
                                       "name_taken", enrollment, user)
                    device = Device(user_id=user.id, name=name, pubkey=req.pubkey, created_at=self.ctx.clock.now())  # type: ignore[arg-type]
                    session.add(device)
                    await session.flush()
                    configs = await self._place_everywhere(session, device, user)
                    token = await self._new_polling_token(session, device)
                    enqueue_event(
                        session,
                        EnrollmentDeviceCreated(
                            enrollment_id=enrollment.id, user_id=user.id, username=user.username,  # type: ignore[arg-type]
                            device_id=device.id, device_name=device.name,  # type: ignore[arg-type]
                            locations=[c.network_id for c in configs], client_ip=req.client.ip,
                        ),
                    )
            except IntegrityError:
                raise _Refusal(ErrorStatus.INVALID_ARGUMENT, PUBKEY_TAKEN, "pubkey_taken") from None
        except _Refusal as refusal:
            raise await self._refused("create_device", refusal, req.client) from None
        return self._result(device, user, configs, token, req.reply_key)

    async def network_info(self, req: EnrollNetworkInfoRequest) -> AppDeviceConfigResult:
        """Defguard's "Instance Update": the current configuration of a device the
        session's user owns, with a fresh polling token."""
        if not is_key(req.reply_key):
            raise RpcFailure(ErrorStatus.INVALID_ARGUMENT, "reply_key must be an X25519 public key")
        try:
            async with self.ctx.transaction() as session:
                enrollment, user = await self._session(session, req)
                if not is_key(req.pubkey):
                    raise _Refusal(ErrorStatus.INVALID_ARGUMENT, INVALID_PUBKEY, "invalid_pubkey", enrollment, user)
                device = (await session.exec(select(Device).where(Device.pubkey == req.pubkey))).first()
                if device is None or device.user_id != user.id:
                    raise _Refusal(ErrorStatus.INVALID_ARGUMENT, DEVICE_NOT_FOUND, "device_not_found", enrollment, user)
                configs = await self._place_everywhere(session, device, user)
                token = await self._new_polling_token(session, device)
        except _Refusal as refusal:
            raise await self._refused("network_info", refusal, req.client) from None
        return self._result(device, user, configs, token, req.reply_key)

    async def poll(self, req: PollRequest) -> AppDeviceConfigResult:
        """The device's current configuration: every location as it is now, including
        locations added since the app enrolled (the device is placed there first)."""
        if not is_key(req.reply_key):
            raise RpcFailure(ErrorStatus.INVALID_ARGUMENT, "reply_key must be an X25519 public key")
        token = self._open(req.token_sealed, "token_sealed")
        async with self.ctx.db.reader() as session:
            row = (
                await session.exec(
                    select(Device, User)
                    .join(PollingToken, col(PollingToken.device_id) == Device.id)
                    .join(User, col(User.id) == Device.user_id)
                    .where(PollingToken.token_hash == token_hash(token))
                )
            ).first()
            if row is None or not row[1].is_active:
                raise RpcFailure(ErrorStatus.PERMISSION_DENIED, INVALID_TOKEN)
            device, user = row
            configs = await self._configs(session, device)
            missing = await self._missing_locations(session, device)
        if missing:
            async with self.ctx.transaction() as session:
                configs = await self._place_everywhere(session, device, user)
        return self._result(device, user, configs, token, req.reply_key)

    async def _missing_locations(self, session: AsyncSession, device: Device) -> bool:
        placed = select(LocationDevice.location_id).where(LocationDevice.device_id == device.id)
        return (await session.exec(select(Location.id).where(col(Location.id).not_in(placed)))).first() is not None

    async def _configs(self, session: AsyncSession, device: Device) -> list[AppLocationConfig]:
        rows = (
            await session.exec(
                select(Location, LocationDevice)
                .join(LocationDevice, col(LocationDevice.location_id) == Location.id)
                .where(LocationDevice.device_id == device.id)
                .order_by(col(Location.id))
            )
        ).all()
        return [app_location_config(location, placement) for location, placement in rows]

    async def _place_everywhere(self, session: AsyncSession, device: Device, user: User) -> list[AppLocationConfig]:
        """Place the device at every location it is not at yet (each location locked, which
        serialises address allocation); the configs of all of them."""
        placed = select(LocationDevice.location_id).where(LocationDevice.device_id == device.id)
        missing = (
            await session.exec(
                select(Location).where(col(Location.id).not_in(placed)).order_by(col(Location.id)).with_for_update()
            )
        ).all()
        for location in missing:
            await place_device(self.ctx, session, location, device, user)
        return await self._configs(session, device)

    async def _new_polling_token(self, session: AsyncSession, device: Device) -> str:
        """A new polling token for the device; the previous one stops working."""
        token = new_token(TOKEN_BITS)
        await session.exec(delete(PollingToken).where(col(PollingToken.device_id) == device.id))
        await session.flush()
        session.add(PollingToken(token_hash=token_hash(token), device_id=device.id, created_at=self.ctx.clock.now()))  # type: ignore[arg-type]
        return token

    def _result(
        self, device: Device, user: User, configs: list[AppLocationConfig], token: str, reply_key: str
    ) -> AppDeviceConfigResult:
        return AppDeviceConfigResult(
            device=AppDevice(
                id=device.id,  # type: ignore[arg-type]
                name=device.name,
                pubkey=device.pubkey,
                user_id=device.user_id,
                created_at=int(device.created_at.timestamp()),
            ),
            configs=configs,
            username=user.username,
            instance_id=self.ctx.vault.instance_id,
            instance_name=self.ctx.settings.instance_name,
            token_sealed=seal(reply_key, token),
        )

    # --- housekeeping -------------------------------------------------------------------

    async def expire(self) -> int:
        """Forget the setup secrets of sessions past their deadline, and drop enrollments
        long closed; returns how many sessions were closed."""
        now = self.ctx.clock.now()
        async with self.ctx.transaction() as session:
            closed = await session.exec(
                update(Enrollment)
                .where(col(Enrollment.session_deadline) <= now,
                       col(Enrollment.setup_method).is_not(None) | col(Enrollment.email_code_hash).is_not(None))
                .values(setup_method=None, email_code_hash=None)
            )
            await session.exec(delete(Enrollment).where(col(Enrollment.expires_at) < now - ENROLLMENT_RETENTION,
                                                        col(Enrollment.created_at) < now - ENROLLMENT_RETENTION))
        return closed.rowcount or 0

    # --- the phone's signing key --------------------------------------------------------

    async def register_mobile(self, req: RegisterMobileRequest) -> Empty:
        """Bind a phone app's Ed25519 key to its device. The phone proves it may: with the
        enrollment cookie of its owner's live session (Defguard's apps), or with the
        one-time code of an admin's allowance (`wgmfa mobile register`). The device's
        public key alone proves nothing: it is not a secret."""
        if req.cookie_sealed is None and req.code_sealed is None:
            raise RpcFailure(ErrorStatus.INVALID_ARGUMENT, NO_TOKEN)
        for value, message in ((req.auth_pub_key, INVALID_AUTH_KEY), (req.device_pub_key, INVALID_DEVICE_KEY)):
            if not is_key(value):
                raise RpcFailure(ErrorStatus.INVALID_ARGUMENT, message)
        code = self._open(req.code_sealed, "code_sealed") if req.cookie_sealed is None and req.code_sealed else None
        wrong_code = False
        try:
            async with self.ctx.transaction() as session:
                device = (
                    await session.exec(select(Device).where(Device.pubkey == req.device_pub_key).with_for_update())
                ).first()
                if req.cookie_sealed is not None:
                    enrollment, user = await self._session(session, req)  # type: ignore[arg-type]
                    if device is None or device.user_id != user.id:
                        raise _Refusal(ErrorStatus.INVALID_ARGUMENT, DEVICE_NOT_FOUND, "device_not_found", enrollment, user)
                else:
                    assert code is not None
                    if device is None:
                        raise _Refusal(ErrorStatus.INVALID_ARGUMENT, DEVICE_NOT_FOUND, "device_not_found")
                    user = await session.get(User, device.user_id)
                    now = self.ctx.clock.now()
                    if (device.mobile_registration_until is None or device.mobile_registration_until <= now
                            or device.mobile_registration_code_hash is None):
                        raise _Refusal(ErrorStatus.PERMISSION_DENIED, MOBILE_NOT_ALLOWED, "not_allowed", user=user)
                    # counted before the check; too many wrong codes withdraw the allowance
                    device.mobile_registration_failures += 1
                    if not hmac.compare_digest(device.mobile_registration_code_hash, mobile_code_hash(self.ctx, device, code)):
                        wrong_code = True
                        if device.mobile_registration_failures >= self.ctx.settings.max_failed_attempts:
                            device.mobile_registration_until = None
                            device.mobile_registration_code_hash = None
                        session.add(device)
                if not wrong_code:
                    assert device is not None and user is not None
                    taken = (await session.exec(select(MobileKey).where(MobileKey.public_key == req.auth_pub_key))).first()
                    if taken is not None and taken.device_id != device.id:
                        raise RpcFailure(ErrorStatus.CONFLICT, "this key is registered to another device")
                    await session.exec(delete(MobileKey).where(col(MobileKey.device_id) == device.id))
                    await session.flush()
                    session.add(MobileKey(user_id=device.user_id, device_id=device.id, public_key=req.auth_pub_key))  # type: ignore[arg-type]
                    device.mobile_registration_until = None  # one registration per allowance
                    device.mobile_registration_code_hash = None
                    device.mobile_registration_failures = 0
                    session.add(device)
                    enqueue_event(
                        session,
                        MobileKeyRegistered(user_id=user.id, username=user.username, device_id=device.id,  # type: ignore[arg-type]
                                            device_name=device.name, client_ip=req.client.ip),
                    )
        except _Refusal as refusal:
            raise await self._refused("register_mobile", refusal, req.client) from None
        if wrong_code:
            raise await self._refused(
                "register_mobile", _Refusal(ErrorStatus.PERMISSION_DENIED, WRONG_MOBILE_CODE, "wrong_code", user=user),
                req.client,
            )
        return Empty()
