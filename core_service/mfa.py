"""Client MFA logins: start (choose a factor, get an opaque token) and finish (prove the
factor, get a fresh PSK). Wire behaviour follows Defguard's core, strings included.

Factors: TOTP (0), an emailed code (1), a phone signing the challenge of its own login
(3, biometric), and a phone approving a desktop's login by signing its challenge (4,
mobile approve: `finish_remote`, then the proxy holding the desktop's socket finishes).
"""
from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import logging
import secrets
import string
from datetime import datetime, timedelta
from uuid import UUID

from nacl.exceptions import BadSignatureError
from nacl.signing import VerifyKey
from sqlmodel import col, delete, select, update
from sqlmodel.ext.asyncio.session import AsyncSession

from core_service import totp
from core_service.context import CoreContext
from core_service.mailer import MailError, Mailer
from core_service.models import Device, Location, LocationDevice, MfaLogin, MobileKey, User
from core_service.outbox import enqueue_event, enqueue_notify
from core_service.sessions import authorize, names
from events.sealing import SealError, b64decode_key, is_key, seal
from schemas.common import LIVE_LOGIN_STATES, LoginState, MfaMethod, MfaMode, method_name, uuid7
from schemas.events import LoginApproved, MfaEmailSent, MfaFailed, MfaLocked, MfaStarted, MfaSucceeded, MobileKeyRegistered
from schemas.rpc import (
    Empty,
    ErrorStatus,
    MfaFinishRemoteRequest,
    MfaFinishRequest,
    MfaFinishResult,
    MfaStartRequest,
    MfaStartResult,
    RegisterMobileRequest,
    RpcFailure,
    TokenStatusRequest,
    TokenStatusResult,
)

log = logging.getLogger(__name__)

TOKEN_BYTES = 24  # 192 bits
CHALLENGE_LENGTH = 44  # alphanumeric, as Defguard's: about 262 bits
MAX_USER_LOCK_S = 3600
FIRST_USER_LOCK_S = 60
LOGIN_RETENTION = timedelta(days=7)

METHODS_BY_MODE = {
    MfaMode.INTERNAL: {MfaMethod.TOTP, MfaMethod.EMAIL, MfaMethod.BIOMETRIC, MfaMethod.MOBILE_APPROVE},
    MfaMode.EXTERNAL: {MfaMethod.OIDC},
}
SIGNED_METHODS = {MfaMethod.BIOMETRIC, MfaMethod.MOBILE_APPROVE}

LOCATION_NOT_FOUND = "location not found"
MFA_NOT_ENABLED = "MFA not enabled for location"
DEVICE_NOT_FOUND = "device not found"
USER_NOT_FOUND = "user not found"
UNAUTHORIZED = "unauthorized"
INVALID_METHOD = "invalid MFA method selected"
METHOD_NOT_SUPPORTED = "selected MFA method not supported by location"
METHOD_NOT_AVAILABLE = "selected MFA method not available"
METHOD_NOT_AVAILABLE_FOR_DEVICE = "Select MFA method not available for the device."
INVALID_TOKEN = "invalid token"
LOGIN_NOT_FOUND = "login session not found"
TOTP_CODE_MISSING = "TOTP code not provided"
EMAIL_CODE_MISSING = "email MFA code not provided"
SIGNATURE_MISSING_BIOMETRIC = "Challenge not found in request"
SIGNATURE_MISSING = "Signature not found in request"
AUTH_KEY_MISSING = "Authorization device key missing in request"
AUTH_KEY_NOT_OURS = "Arguments invalid"
WRONG_METHOD = "invalid MFA method"
NOT_APPROVED = "mobile approval not completed yet"
INVALID_AUTH_KEY = "Invalid biometric public key."
INVALID_DEVICE_KEY = "Invalid device public key."


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def new_challenge() -> str:
    alphabet = string.ascii_letters + string.digits
    return "".join(secrets.choice(alphabet) for _ in range(CHALLENGE_LENGTH))


def signature_valid(public_key: str, challenge: str, signature: str) -> bool:
    """Ed25519 over the challenge's UTF-8 bytes; key and signature base64."""
    try:
        raw_signature = base64.b64decode(signature, validate=True)
        VerifyKey(b64decode_key(public_key, what="signing key")).verify(challenge.encode(), raw_signature)
        return True
    except (BadSignatureError, SealError, binascii.Error, ValueError, TypeError):
        return False


def masked_address(address: str) -> str:
    local, _, domain = address.partition("@")
    return f"{local[:1]}***@{domain}"


def _bad(message: str) -> RpcFailure:
    return RpcFailure(ErrorStatus.INVALID_ARGUMENT, message)


class _FactorFailed(Exception):
    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class Mfa:
    def __init__(self, ctx: CoreContext, mailer: Mailer | None = None) -> None:
        self.ctx = ctx
        self.mailer = mailer

    # --- start ------------------------------------------------------------------------------

    async def start(self, req: MfaStartRequest) -> MfaStartResult:
        if not is_key(req.reply_key):
            raise _bad("reply_key must be an X25519 public key")
        now = self.ctx.clock.now()
        token = secrets.token_urlsafe(TOKEN_BYTES)
        code = None
        async with self.ctx.transaction() as session:
            location = await session.get(Location, req.location_id)
            if location is None or location.removed_at is not None:
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
            await self._check_configured(session, user, device, method)
            if user.mfa_locked_until is not None and user.mfa_locked_until > now:
                wait = int((user.mfa_locked_until - now).total_seconds()) + 1
                raise RpcFailure(ErrorStatus.RATE_LIMITED, "too many failed MFA attempts; try again later", wait)
            if method == MfaMethod.EMAIL:
                await self._check_email_budget(session, user, now)
            # One live login per device and location: a new start replaces the previous one
            # (and with it a mailed code or a challenge).
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
                challenge=new_challenge() if method in SIGNED_METHODS else None,
                client_ip=req.client.ip,
                created_at=now,
                expires_at=now + timedelta(seconds=self.ctx.settings.login_ttl_s),
            )
            if method == MfaMethod.EMAIL:
                code = f"{secrets.randbelow(10**6):06d}"
                login.email_code_hash = self.ctx.vault.code_hash(login.id, code)
            session.add(login)
            ids = names(location, device, user)
            enqueue_event(
                session,
                MfaStarted(**ids, login_id=login.id, method=login.method, client_ip=req.client.ip,  # type: ignore[arg-type]
                           expires_at=login.expires_at),
            )
        if code is not None:
            await self._mail_code(login, location, device, user, code, req.client.ip)
        return MfaStartResult(token_sealed=seal(req.reply_key, token), challenge=login.challenge)

    async def _check_configured(self, session: AsyncSession, user: User, device: Device, method: MfaMethod) -> None:
        if method == MfaMethod.TOTP:
            available = user.totp_secret_enc is not None
        elif method == MfaMethod.EMAIL:
            available = user.email_mfa_enabled and self.mailer is not None
        elif method == MfaMethod.BIOMETRIC:
            if (await session.exec(select(MobileKey.id).where(MobileKey.device_id == device.id))).first() is None:
                raise _bad(METHOD_NOT_AVAILABLE_FOR_DEVICE)
            available = True
        elif method == MfaMethod.MOBILE_APPROVE:
            available = (await session.exec(select(MobileKey.id).where(MobileKey.user_id == user.id))).first() is not None
        else:
            available = False  # OIDC comes with its own issue
        if not available:
            raise _bad(METHOD_NOT_AVAILABLE)

    async def _check_email_budget(self, session: AsyncSession, user: User, now: datetime) -> None:
        """At most email_per_user_limit mails per user per window; then 429."""
        window = timedelta(seconds=self.ctx.settings.email_limit_window_s)
        sent = (
            await session.exec(
                select(MfaLogin.created_at)
                .where(MfaLogin.user_id == user.id, MfaLogin.method == "email", col(MfaLogin.created_at) > now - window)
                .order_by(col(MfaLogin.created_at))
            )
        ).all()
        if len(sent) >= self.ctx.settings.email_per_user_limit:
            wait = int((sent[0] + window - now).total_seconds()) + 1
            raise RpcFailure(ErrorStatus.RATE_LIMITED, "too many MFA emails; try again later", wait)

    async def _mail_code(
        self, login: MfaLogin, location: Location, device: Device, user: User, code: str, client_ip: str | None
    ) -> None:
        """Mail the code after the login is committed (no transaction held over SMTP); if
        the mail cannot go, the login dies: nothing is left pending."""
        assert self.mailer is not None
        expires = login.expires_at.strftime("%Y-%m-%d %H:%M:%S UTC")
        subject = f"Your wgmfa code for {location.name} ({device.name})"
        body = (
            f"Hello {user.username},\n\n"
            f"your device \"{device.name}\" asked to connect to the VPN location \"{location.name}\""
            f"{f' from {client_ip}' if client_ip else ''} at {login.created_at.strftime('%Y-%m-%d %H:%M:%S UTC')}.\n\n"
            f"Your code: {code}\n\n"
            f"It works once and expires at {expires} (in {self.ctx.settings.login_ttl_s // 60} minutes).\n"
            f"If you did not ask for it, do not use it, and tell your administrator.\n"
        )
        try:
            await self.mailer.send(user.email, subject, body)
        except MailError as exc:
            log.warning("could not mail the code of login %s: %s", login.id, exc)
            async with self.ctx.transaction() as session:
                await session.exec(update(MfaLogin).where(col(MfaLogin.id) == login.id).values(state=LoginState.EXPIRED))
                enqueue_event(
                    session,
                    MfaFailed(**names(location, device, user), login_id=login.id, method="email",
                              reason="email_unavailable", failed_attempts=0, client_ip=client_ip),
                )
            raise RpcFailure(ErrorStatus.UNAVAILABLE, f"cannot send the MFA email: {exc}") from None
        async with self.ctx.transaction() as session:
            enqueue_event(
                session,
                MfaEmailSent(**names(location, device, user), login_id=login.id, to=masked_address(user.email),
                             expires_at=login.expires_at),
            )

    # --- finish -----------------------------------------------------------------------------

    def _open(self, sealed: str | None) -> str | None:
        if sealed is None:
            return None
        try:
            return self.ctx.vault.open_sealed(sealed)
        except SealError:
            raise _bad(INVALID_TOKEN) from None

    async def _live_login(self, session: AsyncSession, token: str, *, states: tuple[str, ...]) -> tuple[MfaLogin, bool]:
        """The login of `token`, locked, in one of `states`; (login, expired). An expired
        one is marked so and must be committed before answering `login session not found`."""
        login = (
            await session.exec(select(MfaLogin).where(MfaLogin.token_hash == token_hash(token)).with_for_update())
        ).first()
        if login is None or login.state not in states:
            raise _bad(LOGIN_NOT_FOUND)
        if login.expires_at <= self.ctx.clock.now():
            login.state = LoginState.EXPIRED
            session.add(login)
            return login, True
        return login, False

    async def finish(self, req: MfaFinishRequest) -> MfaFinishResult:
        if not is_key(req.reply_key):
            raise _bad("reply_key must be an X25519 public key")
        token = self._open(req.token_sealed)
        code = self._open(req.code_sealed)
        assert token is not None
        login_id: UUID | None = None
        expired = False
        try:
            async with self.ctx.transaction() as session:
                login, expired = await self._live_login(session, token, states=(LoginState.PENDING, LoginState.APPROVED))
                if not expired:
                    login_id = login.id
                    psk = await self._verify_and_authorize(session, login, code, req)
        except _FactorFailed as failure:
            raise await self._failed(login_id, failure, req.client.ip) from None
        if expired:
            raise _bad(LOGIN_NOT_FOUND)
        return MfaFinishResult(psk_sealed=seal(req.reply_key, psk))

    async def _verify_and_authorize(
        self, session: AsyncSession, login: MfaLogin, code: str | None, req: MfaFinishRequest
    ) -> str:
        now = self.ctx.clock.now()
        method = MfaMethod[login.method.upper()]
        user = (await session.exec(select(User).where(User.id == login.user_id).with_for_update())).one()
        if method == MfaMethod.MOBILE_APPROVE:
            if login.state != LoginState.APPROVED:
                raise RpcFailure(ErrorStatus.FAILED_PRECONDITION, NOT_APPROVED)
        else:
            if login.state != LoginState.PENDING:
                raise _bad(LOGIN_NOT_FOUND)
            missing = {MfaMethod.TOTP: TOTP_CODE_MISSING, MfaMethod.EMAIL: EMAIL_CODE_MISSING,
                       MfaMethod.BIOMETRIC: SIGNATURE_MISSING_BIOMETRIC}
            if method not in missing:
                raise _bad(METHOD_NOT_AVAILABLE)
            if code is None:
                raise _bad(missing[method])
            if user.mfa_locked_until is not None and user.mfa_locked_until > now:
                raise _FactorFailed("locked_out")
            if not user.is_active:
                raise _FactorFailed("factor_unavailable")
            await self._verify_factor(session, login, user, method, code, now)
        location = await session.get(Location, login.location_id)
        device = await session.get(Device, login.device_id)
        assert location is not None and device is not None
        login.state = LoginState.FINISHED
        login.finished_at = now
        login.challenge = None
        login.email_code_hash = None
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

    async def _verify_factor(
        self, session: AsyncSession, login: MfaLogin, user: User, method: MfaMethod, code: str, now: datetime
    ) -> None:
        """Raise _FactorFailed unless `code` proves the factor; a success resets the user's
        failure count."""
        if method == MfaMethod.TOTP:
            if user.totp_secret_enc is None:
                raise _FactorFailed("factor_unavailable")
            step = totp.matching_step(self.ctx.vault.decrypt(user.totp_secret_enc), code, now)
            if step is None:
                raise _FactorFailed("wrong_code")
            # Each time step is accepted once per user, atomically: of two logins racing
            # with one code, exactly one moves the step forward.
            claimed = await session.exec(
                update(User)
                .where(col(User.id) == user.id, (col(User.totp_last_step).is_(None)) | (col(User.totp_last_step) < step))
                .values(totp_last_step=step, mfa_failures=0, mfa_locked_until=None)
            )
            if claimed.rowcount != 1:
                raise _FactorFailed("replayed_code")
            return
        if method == MfaMethod.EMAIL:
            expected = login.email_code_hash or ""
            if not hmac.compare_digest(expected, self.ctx.vault.code_hash(login.id, code.strip())):
                raise _FactorFailed("wrong_code")
        elif method == MfaMethod.BIOMETRIC:
            key = (await session.exec(select(MobileKey).where(MobileKey.device_id == login.device_id))).first()
            if key is None or login.challenge is None:
                raise _FactorFailed("factor_unavailable")
            if not signature_valid(key.public_key, login.challenge, code):
                raise _FactorFailed("bad_signature")
        await session.exec(update(User).where(col(User.id) == user.id).values(mfa_failures=0, mfa_locked_until=None))

    async def finish_remote(self, req: MfaFinishRemoteRequest) -> Empty:
        """The phone approves a desktop's login (method 4). The PSK goes to the desktop's
        socket, not to the phone: the approval only wakes the proxy holding that socket."""
        token = self._open(req.token_sealed)
        signature = self._open(req.code_sealed)
        assert token is not None
        if signature is None:
            raise _bad(SIGNATURE_MISSING)
        if req.auth_pub_key is None:
            raise _bad(AUTH_KEY_MISSING)
        login_id: UUID | None = None
        expired = False
        try:
            async with self.ctx.transaction() as session:
                login, expired = await self._live_login(session, token, states=(LoginState.PENDING,))
                if not expired:
                    login_id = login.id
                    if login.method != method_name(MfaMethod.MOBILE_APPROVE):
                        raise _bad(WRONG_METHOD)
                    key = (
                        await session.exec(
                            select(MobileKey).where(
                                MobileKey.public_key == req.auth_pub_key, MobileKey.user_id == login.user_id
                            )
                        )
                    ).first()
                    if key is None:
                        raise _bad(AUTH_KEY_NOT_OURS)  # not a key of this login's user
                    user = await session.get(User, login.user_id)
                    now = self.ctx.clock.now()
                    if user is None or (user.mfa_locked_until is not None and user.mfa_locked_until > now):
                        raise _FactorFailed("locked_out")
                    if login.challenge is None or not signature_valid(key.public_key, login.challenge, signature):
                        raise _FactorFailed("bad_signature")
                    login.state = LoginState.APPROVED
                    login.challenge = None  # single use
                    session.add(login)
                    await session.exec(update(User).where(col(User.id) == user.id).values(mfa_failures=0, mfa_locked_until=None))
                    enqueue_notify(session, LoginApproved(login_id=login.id))
        except _FactorFailed as failure:
            raise await self._failed(login_id, failure, req.client.ip) from None
        if expired:
            raise _bad(LOGIN_NOT_FOUND)
        log.info("login %s approved by a mobile key", login_id)
        return Empty()

    async def token_status(self, req: TokenStatusRequest) -> TokenStatusResult:
        token = self._open(req.token_sealed)
        assert token is not None
        async with self.ctx.db.reader() as session:
            login = (await session.exec(select(MfaLogin).where(MfaLogin.token_hash == token_hash(token)))).first()
        if login is None or login.state not in LIVE_LOGIN_STATES or login.expires_at <= self.ctx.clock.now():
            raise RpcFailure(ErrorStatus.UNAUTHENTICATED, LOGIN_NOT_FOUND)
        return TokenStatusResult(login_id=str(login.id), method=login.method, state=login.state, expires_at=login.expires_at)

    # --- mobile keys ------------------------------------------------------------------------

    async def register_mobile(self, req: RegisterMobileRequest) -> Empty:
        """Bind a phone app's Ed25519 key to its device, if an admin allowed it."""
        for value, message in ((req.auth_pub_key, INVALID_AUTH_KEY), (req.device_pub_key, INVALID_DEVICE_KEY)):
            if not is_key(value):
                raise _bad(message)
        now = self.ctx.clock.now()
        async with self.ctx.transaction() as session:
            device = (await session.exec(select(Device).where(Device.pubkey == req.device_pub_key).with_for_update())).first()
            if device is None:
                raise _bad(DEVICE_NOT_FOUND)
            if device.mobile_registration_until is None or device.mobile_registration_until <= now:
                raise RpcFailure(
                    ErrorStatus.PERMISSION_DENIED,
                    "mobile registration is not allowed for this device; an administrator allows it with "
                    "`wgmfa admin mobile allow USER DEVICE`",
                )
            taken = (await session.exec(select(MobileKey).where(MobileKey.public_key == req.auth_pub_key))).first()
            if taken is not None and taken.device_id != device.id:
                raise RpcFailure(ErrorStatus.CONFLICT, "this key is registered to another device")
            await session.exec(delete(MobileKey).where(col(MobileKey.device_id) == device.id))
            await session.flush()
            session.add(MobileKey(user_id=device.user_id, device_id=device.id, public_key=req.auth_pub_key))  # type: ignore[arg-type]
            device.mobile_registration_until = None  # one registration per allowance
            session.add(device)
            user = await session.get(User, device.user_id)
            assert user is not None
            enqueue_event(
                session,
                MobileKeyRegistered(user_id=user.id, username=user.username, device_id=device.id,  # type: ignore[arg-type]
                                    device_name=device.name, client_ip=req.client.ip),
            )
        return Empty()

    # --- failures ---------------------------------------------------------------------------

    async def _failed(self, login_id: UUID | None, failure: _FactorFailed, client_ip: str | None) -> RpcFailure:
        """Record a failed factor; the answer never says which part was wrong."""
        assert login_id is not None
        await self._record_failure(login_id, failure.reason, client_ip)
        return RpcFailure(ErrorStatus.UNAUTHENTICATED, UNAUTHORIZED)

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
                MfaFailed(**ids, login_id=login.id, method=login.method, reason=reason,  # type: ignore[arg-type]
                          failed_attempts=login.failed_attempts, client_ip=client_ip),
            )
            if login_dead or locked_until is not None:
                enqueue_event(
                    session,
                    MfaLocked(**ids, login_id=login.id, method=login.method,  # type: ignore[arg-type]
                              failed_attempts=login.failed_attempts, login_dead=login_dead,
                              user_locked_until=locked_until, client_ip=client_ip),
                )
        log.info("MFA login %s failed (%s), attempt %s", login_id, reason, login.failed_attempts)

    async def expire_logins(self) -> int:
        """Close logins past their expiry and drop old finished ones."""
        now = self.ctx.clock.now()
        async with self.ctx.transaction() as session:
            result = await session.exec(
                update(MfaLogin)
                .where(col(MfaLogin.state).in_(LIVE_LOGIN_STATES), col(MfaLogin.expires_at) <= now)
                .values(state=LoginState.EXPIRED, challenge=None, email_code_hash=None)
            )
            await session.exec(
                delete(MfaLogin).where(
                    col(MfaLogin.state).not_in(LIVE_LOGIN_STATES), col(MfaLogin.created_at) < now - LOGIN_RETENTION
                )
            )
        return result.rowcount or 0
