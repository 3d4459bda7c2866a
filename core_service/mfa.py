"""Client MFA logins: start (choose a factor, get an opaque token) and finish (prove the
factor, get a fresh PSK). Wire behaviour follows Defguard's core, strings included."""
from __future__ import annotations

import hashlib
import logging
import secrets
from datetime import timedelta
from uuid import UUID

from sqlmodel import col, delete, select, update
from sqlmodel.ext.asyncio.session import AsyncSession

from core_service import totp
from core_service.context import CoreContext
from core_service.models import Device, Location, LocationDevice, MfaLogin, User
from core_service.outbox import enqueue_event
from core_service.sessions import authorize, names
from events.sealing import SealError, is_key, seal
from schemas.common import LIVE_LOGIN_STATES, LoginState, MfaMethod, MfaMode, method_name, uuid7
from schemas.events import MfaFailed, MfaLocked, MfaStarted, MfaSucceeded
from schemas.rpc import ErrorStatus, MfaFinishRequest, MfaFinishResult, MfaStartRequest, MfaStartResult, RpcFailure

log = logging.getLogger(__name__)

TOKEN_BYTES = 24  # 192 bits
MAX_USER_LOCK_S = 3600
FIRST_USER_LOCK_S = 60
LOGIN_RETENTION = timedelta(days=7)

METHODS_BY_MODE = {
    MfaMode.INTERNAL: {MfaMethod.TOTP, MfaMethod.EMAIL, MfaMethod.BIOMETRIC, MfaMethod.MOBILE_APPROVE},
    MfaMode.EXTERNAL: {MfaMethod.OIDC},
}
IMPLEMENTED_METHODS = {MfaMethod.TOTP}

LOCATION_NOT_FOUND = "location not found"
MFA_NOT_ENABLED = "MFA not enabled for location"
DEVICE_NOT_FOUND = "device not found"
USER_NOT_FOUND = "user not found"
UNAUTHORIZED = "unauthorized"
INVALID_METHOD = "invalid MFA method selected"
METHOD_NOT_SUPPORTED = "selected MFA method not supported by location"
METHOD_NOT_AVAILABLE = "selected MFA method not available"
INVALID_TOKEN = "invalid token"
LOGIN_NOT_FOUND = "login session not found"
TOTP_CODE_MISSING = "TOTP code not provided"


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def _bad(message: str) -> RpcFailure:
    return RpcFailure(ErrorStatus.INVALID_ARGUMENT, message)


class _FactorFailed(Exception):
    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class Mfa:
    def __init__(self, ctx: CoreContext) -> None:
        self.ctx = ctx

    async def start(self, req: MfaStartRequest) -> MfaStartResult:
        if not is_key(req.reply_key):
            raise _bad("reply_key must be an X25519 public key")
        now = self.ctx.clock.now()
        token = secrets.token_urlsafe(TOKEN_BYTES)
        async with self.ctx.transaction() as session:
            location = await session.get(Location, req.location_id)
            if location is None:
                raise _bad(LOCATION_NOT_FOUND)
            mode = MfaMode(location.mfa_mode)
            if mode == MfaMode.DISABLED:
                raise _bad(MFA_NOT_ENABLED)
            device = (await session.exec(select(Device).where(Device.pubkey == req.pubkey))).first()
            if device is None or await session.get(LocationDevice, (location.id, device.id)) is None:
                raise _bad(DEVICE_NOT_FOUND)
            user = await session.get(User, device.user_id)
            if user is None:
                raise _bad(USER_NOT_FOUND)
            if not user.is_active:
                raise RpcFailure(ErrorStatus.UNAUTHENTICATED, UNAUTHORIZED)
            try:
                method = MfaMethod(req.method)
            except ValueError:
                raise _bad(INVALID_METHOD) from None
            if method not in METHODS_BY_MODE[mode]:
                raise _bad(METHOD_NOT_SUPPORTED)
            if method not in IMPLEMENTED_METHODS or not self._configured(user, method):
                raise _bad(METHOD_NOT_AVAILABLE)
            if user.mfa_locked_until is not None and user.mfa_locked_until > now:
                wait = int((user.mfa_locked_until - now).total_seconds()) + 1
                raise RpcFailure(ErrorStatus.RATE_LIMITED, "too many failed MFA attempts; try again later", wait)
            # One live login per device and location: a new start replaces the previous one.
            await session.exec(
                update(MfaLogin)
                .where(
                    col(MfaLogin.location_id) == location.id,
                    col(MfaLogin.device_id) == device.id,
                    col(MfaLogin.state).in_(LIVE_LOGIN_STATES),
                )
                .values(state=LoginState.EXPIRED)
            )
            login = MfaLogin(
                id=uuid7(),
                token_hash=token_hash(token),
                location_id=location.id,  # type: ignore[arg-type]
                device_id=device.id,  # type: ignore[arg-type]
                user_id=user.id,  # type: ignore[arg-type]
                method=method_name(method),
                state=LoginState.PENDING,
                client_ip=req.client.ip,
                created_at=now,
                expires_at=now + timedelta(seconds=self.ctx.settings.login_ttl_s),
            )
            session.add(login)
            enqueue_event(
                session,
                MfaStarted(
                    **names(location, device, user),
                    login_id=login.id,
                    method=login.method,  # type: ignore[arg-type]
                    client_ip=req.client.ip,
                    expires_at=login.expires_at,
                ),
            )
        return MfaStartResult(token_sealed=seal(req.reply_key, token), challenge=None)

    @staticmethod
    def _configured(user: User, method: MfaMethod) -> bool:
        if method == MfaMethod.TOTP:
            return user.totp_secret_enc is not None
        return False

    async def finish(self, req: MfaFinishRequest) -> MfaFinishResult:
        if not is_key(req.reply_key):
            raise _bad("reply_key must be an X25519 public key")
        try:
            token = self.ctx.vault.open_sealed(req.token_sealed)
            code = self.ctx.vault.open_sealed(req.code_sealed) if req.code_sealed is not None else None
        except SealError:
            raise _bad(INVALID_TOKEN) from None
        now = self.ctx.clock.now()
        login_id: UUID | None = None
        expired = False
        try:
            async with self.ctx.transaction() as session:
                login = (
                    await session.exec(select(MfaLogin).where(MfaLogin.token_hash == token_hash(token)).with_for_update())
                ).first()
                if login is None or login.state != LoginState.PENDING:
                    raise _bad(LOGIN_NOT_FOUND)
                if login.expires_at <= now:
                    login.state = LoginState.EXPIRED
                    session.add(login)
                    expired = True
                else:
                    login_id = login.id
                    psk = await self._verify_and_authorize(session, login, code, req)
        except _FactorFailed as failure:
            assert login_id is not None
            await self._record_failure(login_id, failure.reason, req.client.ip)
            raise RpcFailure(ErrorStatus.UNAUTHENTICATED, UNAUTHORIZED) from None
        if expired:
            raise _bad(LOGIN_NOT_FOUND)
        return MfaFinishResult(psk_sealed=seal(req.reply_key, psk))

    async def _verify_and_authorize(
        self, session: AsyncSession, login: MfaLogin, code: str | None, req: MfaFinishRequest
    ) -> str:
        now = self.ctx.clock.now()
        method = MfaMethod[login.method.upper()]
        user = (await session.exec(select(User).where(User.id == login.user_id).with_for_update())).one()
        if method != MfaMethod.TOTP:
            raise _bad(METHOD_NOT_AVAILABLE)
        if code is None:
            raise _bad(TOTP_CODE_MISSING)
        if user.mfa_locked_until is not None and user.mfa_locked_until > now:
            raise _FactorFailed("locked_out")
        if not user.is_active or user.totp_secret_enc is None:
            raise _FactorFailed("factor_unavailable")
        step = totp.matching_step(self.ctx.vault.decrypt(user.totp_secret_enc), code, now)
        if step is None:
            raise _FactorFailed("wrong_code")
        # Each time step is accepted once per user, atomically: of two logins racing with
        # one code, exactly one moves the step forward.
        claimed = await session.exec(
            update(User)
            .where(col(User.id) == user.id, (col(User.totp_last_step).is_(None)) | (col(User.totp_last_step) < step))
            .values(totp_last_step=step, mfa_failures=0, mfa_locked_until=None)
        )
        if claimed.rowcount != 1:
            raise _FactorFailed("replayed_code")
        location = await session.get(Location, login.location_id)
        device = await session.get(Device, login.device_id)
        assert location is not None and device is not None
        login.state = LoginState.FINISHED
        login.finished_at = now
        session.add(login)
        vpn_session, psk = await authorize(
            self.ctx, session, location, device, user, method=login.method, login_id=login.id, now=now
        )
        enqueue_event(
            session,
            MfaSucceeded(
                **names(location, device, user),
                login_id=login.id,
                method=login.method,  # type: ignore[arg-type]
                session_id=vpn_session.id,  # type: ignore[arg-type]
                generation=vpn_session.generation,
                client_ip=req.client.ip,
            ),
        )
        return psk

    async def _record_failure(self, login_id: UUID, reason: str, client_ip: str | None) -> None:
        """Count a failed factor against the login (dead after max_failed_attempts) and the
        user (locked out for a growing while after every max_failed_attempts in a row)."""
        limit = self.ctx.settings.max_failed_attempts
        now = self.ctx.clock.now()
        async with self.ctx.transaction() as session:
            login = (await session.exec(select(MfaLogin).where(MfaLogin.id == login_id).with_for_update())).one()
            if login.state != LoginState.PENDING:
                return
            user = (await session.exec(select(User).where(User.id == login.user_id).with_for_update())).one()
            location = await session.get(Location, login.location_id)
            device = await session.get(Device, login.device_id)
            assert location is not None and device is not None
            login.failed_attempts += 1
            login_dead = login.failed_attempts >= limit
            if login_dead:
                login.state = LoginState.FAILED
            session.add(login)
            locked_until = None
            if reason != "locked_out":
                user.mfa_failures += 1
                if user.mfa_failures % limit == 0:
                    lock_s = min(FIRST_USER_LOCK_S * 2 ** (user.mfa_failures // limit - 1), MAX_USER_LOCK_S)
                    locked_until = now + timedelta(seconds=lock_s)
                    user.mfa_locked_until = locked_until
                session.add(user)
            ids = names(location, device, user)
            enqueue_event(
                session,
                MfaFailed(
                    **ids,
                    login_id=login.id,
                    method=login.method,  # type: ignore[arg-type]
                    reason=reason,
                    failed_attempts=login.failed_attempts,
                    client_ip=client_ip,
                ),
            )
            if login_dead or locked_until is not None:
                enqueue_event(
                    session,
                    MfaLocked(
                        **ids,
                        login_id=login.id,
                        method=login.method,  # type: ignore[arg-type]
                        failed_attempts=login.failed_attempts,
                        login_dead=login_dead,
                        user_locked_until=locked_until,
                        client_ip=client_ip,
                    ),
                )
        log.info("MFA login %s failed (%s), attempt %s", login_id, reason, login.failed_attempts)

    async def expire_logins(self) -> int:
        """Close logins past their expiry and drop old finished ones."""
        now = self.ctx.clock.now()
        async with self.ctx.transaction() as session:
            result = await session.exec(
                update(MfaLogin)
                .where(col(MfaLogin.state).in_(LIVE_LOGIN_STATES), col(MfaLogin.expires_at) <= now)
                .values(state=LoginState.EXPIRED)
            )
            await session.exec(
                delete(MfaLogin).where(
                    col(MfaLogin.state).not_in(LIVE_LOGIN_STATES), col(MfaLogin.created_at) < now - LOGIN_RETENTION
                )
            )
        return result.rowcount or 0
