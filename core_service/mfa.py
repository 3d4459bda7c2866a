"""Client MFA logins: start (choose a factor, get an opaque token) and finish (prove the
factor, get a fresh PSK). Wire behaviour follows Defguard's core, strings included.

Factors: TOTP (0), an emailed code (1), the company's OpenID provider in the browser (2),
a phone signing the challenge of its own login (3, biometric), and a phone approving a
desktop's login by signing its challenge (4, mobile approve: `finish_remote`, then the
proxy holding the desktop's socket finishes). Each is one unit in core_service.factors;
this class runs the lifecycle they share.
"""
from __future__ import annotations

import logging
from datetime import datetime, timedelta
from uuid import UUID

from sqlalchemy import bindparam, insert
from sqlalchemy import select as sql_select
from sqlalchemy import update as sql_update
from sqlmodel import col, delete, select, update
from sqlmodel.ext.asyncio.session import AsyncSession

from core_service import metrics
from core_service.context import CoreContext
from core_service.db import JoinedRead, Snapshot, prepared
from core_service.factors import build_factors
from core_service.factors.base import FactorFailed, token_hash
from core_service.factors.challenge import signature_valid
from core_service.factors.oidc import OidcFactor
from core_service.keys import new_token
from core_service.mailer import Mailer
from core_service.models import Device, Location, LocationDevice, MfaAddressFailures, MfaLogin, MobileKey, User
from core_service.outbox import enqueue_event, enqueue_notify
from core_service.sessions import authorize, names
from schemas.sealing import SealError, is_key, seal
from schemas.common import LIVE_LOGIN_STATES, LoginState, MfaMethod, MfaMode, method_name, uuid7
from schemas.events import LoginApproved, MfaFailed, MfaLocked, MfaStarted, MfaSucceeded
from schemas.rpc import (
    Empty,
    ErrorStatus,
    MfaFinishRemoteRequest,
    MfaFinishRequest,
    MfaFinishResult,
    MfaStartRequest,
    MfaStartResult,
    RpcFailure,
    TokenStatusRequest,
    TokenStatusResult,
)

log = logging.getLogger(__name__)

TOKEN_BITS = 192
MAX_USER_LOCK_S = 3600
FIRST_USER_LOCK_S = 60
LOGIN_RETENTION = timedelta(days=7)
UNFINISHED_LOGIN_RETENTION = timedelta(hours=1)
# what a login that ends unfinished forgets: every secret of a factor in flight
FORGOTTEN_WHEN_ENDED = {
    "challenge": None,
    "email_code_hash": None,
    "oidc_state_hash": None,
    "oidc_browser_hash": None,
    "oidc_nonce": None,
    "oidc_verifier_enc": None,
}

METHODS_BY_MODE = {
    MfaMode.INTERNAL: {MfaMethod.TOTP, MfaMethod.EMAIL, MfaMethod.BIOMETRIC, MfaMethod.MOBILE_APPROVE},
    MfaMode.EXTERNAL: {MfaMethod.OIDC},
}

LOCATION_NOT_FOUND = "location not found"
MFA_NOT_ENABLED = "MFA not enabled for location"
DEVICE_NOT_FOUND = "device not found"
USER_NOT_FOUND = "user not found"
UNAUTHORIZED = "unauthorized"
INVALID_METHOD = "invalid MFA method selected"
METHOD_NOT_SUPPORTED = "selected MFA method not supported by location"
INVALID_TOKEN = "invalid token"
LOGIN_NOT_FOUND = "login session not found"
SIGNATURE_MISSING = "Signature not found in request"
AUTH_KEY_MISSING = "Authorization device key missing in request"
AUTH_KEY_NOT_OURS = "Arguments invalid"
WRONG_METHOD = "invalid MFA method"
TEMPORARILY_LOCKED = "too many failed MFA attempts; try again later"
HARD_LOCKED = "too many failed MFA attempts; an administrator must unlock this user"


def _bad(message: str) -> RpcFailure:
    return RpcFailure(ErrorStatus.INVALID_ARGUMENT, message)


def _address_key(client_ip: str | None) -> str:
    return client_ip or ""


async def reset_failures(session: AsyncSession, user_id: int) -> None:
    """Unlock a user: forget their consecutive failures (which ends a hard lock) and every
    per-address lock. The administrator's unlock."""
    await session.exec(update(User).where(col(User.id) == user_id).values(mfa_failures=0, mfa_locked_until=None))
    await session.exec(delete(MfaAddressFailures).where(col(MfaAddressFailures.user_id) == user_id))


async def lockout_state(session: AsyncSession, ctx: CoreContext, user: User) -> tuple[bool, datetime | None]:
    """(locked until an administrator unlocks, the latest time one of the user's client
    addresses stays locked out), for an administrator's view."""
    hard_locked = user.mfa_failures >= ctx.settings.mfa_hard_lock_failures
    latest = (
        await session.exec(
            select(MfaAddressFailures.locked_until)
            .where(col(MfaAddressFailures.user_id) == user.id, col(MfaAddressFailures.locked_until) > ctx.clock.now())
            .order_by(col(MfaAddressFailures.locked_until).desc())
        )
    ).first()
    return hard_locked, latest


_FactorFailed = FactorFailed
# session.info key: {(user id, client address): whether _lockout found a failure counter}
ADDRESS_COUNTERS_READ = "address_counters_read"
LOGINS = MfaLogin.__table__

# The login path's statements, built once: building a statement costs more CPU than
# SQLite takes to run it. Values come as bound parameters (the b_ names).
_LIVE_LOGIN_OF_DEVICE = (
    LOGINS.c.location_id == bindparam("b_location"),
    LOGINS.c.device_id == bindparam("b_device"),
    LOGINS.c.state.in_(LIVE_LOGIN_STATES),
)
PLACEMENTS = LocationDevice.__table__
USERS = User.__table__
LOCATIONS = Location.__table__
DEVICES = Device.__table__
ADDRESS_FAILURES = MfaAddressFailures.__table__
# the location, the device, its place there, its user and the user's failures from the
# client's address (rows, not entities: db.JoinedRead)
_START_COLUMNS = JoinedRead(LOCATIONS, DEVICES, PLACEMENTS, USERS, ADDRESS_FAILURES)
_START_READ = prepared(
    sql_select(*_START_COLUMNS.columns)
    .select_from(LOCATIONS)
    .outerjoin(DEVICES, DEVICES.c.pubkey == bindparam("b_pubkey"))
    .outerjoin(PLACEMENTS, (PLACEMENTS.c.location_id == LOCATIONS.c.id) & (PLACEMENTS.c.device_id == DEVICES.c.id))
    .outerjoin(USERS, USERS.c.id == DEVICES.c.user_id)
    .outerjoin(
        ADDRESS_FAILURES,
        (ADDRESS_FAILURES.c.user_id == USERS.c.id) & (ADDRESS_FAILURES.c.client_ip == bindparam("b_address")),
    )
    .where(LOCATIONS.c.id == bindparam("b_location"))
)
_INSERT_LOGIN = prepared(insert(LOGINS))
# a new login's columns as they start (the start sets the rest)
_NEW_LOGIN = {
    column.key: column.default.arg if column.default is not None and column.default.is_scalar else None
    for column in LOGINS.c
}
# the login of a token and its user, locked (in that order, as recording a failure takes
# them), with its location, device and the user's failures from the client's address
_FINISH_COLUMNS = JoinedRead(LOGINS, USERS, LOCATIONS, DEVICES, ADDRESS_FAILURES)
_FINISH_READ = prepared(
    sql_select(*_FINISH_COLUMNS.columns)
    .select_from(LOGINS)
    .join(USERS, USERS.c.id == LOGINS.c.user_id)
    .join(LOCATIONS, LOCATIONS.c.id == LOGINS.c.location_id)
    .join(DEVICES, DEVICES.c.id == LOGINS.c.device_id)
    .outerjoin(
        ADDRESS_FAILURES,
        (ADDRESS_FAILURES.c.user_id == USERS.c.id) & (ADDRESS_FAILURES.c.client_ip == bindparam("b_address")),
    )
    .where(LOGINS.c.token_hash == bindparam("b_token"))
    .with_for_update(of=[LOGINS, USERS])
)
_EXPIRE_LOGIN = prepared(sql_update(LOGINS).where(LOGINS.c.id == bindparam("b_id")).values(state=LoginState.EXPIRED))
_FINISH_LOGIN = prepared(
    sql_update(LOGINS)
    .where(LOGINS.c.id == bindparam("b_id"))
    .values(state=LoginState.FINISHED, finished_at=bindparam("b_now"), challenge=None, email_code_hash=None)
)


# one of a login's max_failed_attempts, taken in the transaction that checks the code
_TAKE_ATTEMPT = prepared(
    sql_update(LOGINS)
    .where(LOGINS.c.id == bindparam("b_id"), LOGINS.c.attempts < bindparam("b_limit"))
    .values(attempts=LOGINS.c.attempts + 1)
)
ATTEMPTS_EXHAUSTED = "attempts_exhausted"


class Mfa:
    def __init__(self, ctx: CoreContext, mailer: Mailer | None = None) -> None:
        self.ctx = ctx
        self.mailer = mailer
        self.factors = build_factors(ctx, mailer)
        oidc = self.factors[MfaMethod.OIDC]
        assert isinstance(oidc, OidcFactor)
        self.oidc = oidc  # its browser flow: auth_url and callback
        # the same address's live login, and those from elsewhere beyond the newest
        # max_live_logins - 1 (room for the new one), in one statement
        surplus = (
            select(LOGINS.c.id)
            .where(*_LIVE_LOGIN_OF_DEVICE, LOGINS.c.client_ip.is_distinct_from(bindparam("b_address")))
            .order_by(LOGINS.c.created_at.desc())
            .offset(max(ctx.settings.max_live_logins - 1, 0))
        )
        self._make_room = prepared(
            sql_update(LOGINS)
            .where(
                *_LIVE_LOGIN_OF_DEVICE,
                LOGINS.c.client_ip.is_not_distinct_from(bindparam("b_address")) | LOGINS.c.id.in_(surplus),
            )
            .values(state=LoginState.EXPIRED, **FORGOTTEN_WHEN_ENDED)
        )

    # --- start ------------------------------------------------------------------------------

    async def start(self, req: MfaStartRequest) -> MfaStartResult:
        if not is_key(req.reply_key):
            raise _bad("reply_key must be an X25519 public key")
        now = self.ctx.clock.now()
        token = new_token(TOKEN_BITS)
        code = None
        async with self.ctx.transaction() as session:
            row = (
                await session.exec(
                    _START_READ,
                    params={"b_location": req.location_id, "b_pubkey": req.pubkey, "b_address": _address_key(req.client.ip)},
                )
            ).first()
            if row is None:
                raise _bad(LOCATION_NOT_FOUND)
            location, device, placed, user, counter = _START_COLUMNS.split(row)
            if location is None or location.removed_at is not None:
                raise _bad(LOCATION_NOT_FOUND)
            mode = MfaMode(location.mfa_mode)
            if mode == MfaMode.DISABLED:
                raise _bad(MFA_NOT_ENABLED)
            if device is None or placed is None:
                raise _bad(DEVICE_NOT_FOUND)
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
            lockout = self._lockout(session, user, counter, req.client.ip, now)
            if lockout is not None:
                metrics.LOGINS.labels(method_name(method), "locked_out").inc()
                raise lockout
            await self.factors[method].before_start(session, user, now)
            await self._make_room_for_login(session, location.id, device.id, req.client.ip)  # type: ignore[arg-type]
            login = Snapshot(  # its values only: an ORM instance cost more than the insert
                **_NEW_LOGIN
                | {
                    "id": uuid7(),
                    "token_hash": token_hash(token),
                    "location_id": location.id,
                    "device_id": device.id,
                    "user_id": user.id,
                    "method": method_name(method),
                    "state": LoginState.PENDING,
                    "client_ip": req.client.ip,
                    "created_at": now,
                    "expires_at": now + timedelta(seconds=self.ctx.settings.login_ttl_s),
                }
            )
            code = self.factors[method].prepare(login)  # a challenge, or a code to deliver
            await session.exec(_INSERT_LOGIN, params=vars(login))
            ids = names(location, device, user)
            enqueue_event(
                session,
                MfaStarted(**ids, login_id=login.id, method=login.method, client_ip=req.client.ip,  # type: ignore[arg-type]
                           expires_at=login.expires_at),
            )
        if code is not None:
            await self.factors[method].deliver(login, location, device, user, code, req.client.ip)
        return MfaStartResult(token_sealed=seal(req.reply_key, token), challenge=login.challenge)

    def _lockout(
        self, session: AsyncSession, user: User, counter: MfaAddressFailures | None, client_ip: str | None, now: datetime
    ) -> RpcFailure | None:
        """Why the user may not try a factor now from `client_ip` (whose failure counter,
        read in this transaction, is `counter`), if they may not: locked for good (until an
        administrator unlocks), or this address for a while."""
        if user.mfa_failures >= self.ctx.settings.mfa_hard_lock_failures:
            return RpcFailure(ErrorStatus.PERMISSION_DENIED, HARD_LOCKED)
        session.info.setdefault(ADDRESS_COUNTERS_READ, {})[(user.id, _address_key(client_ip))] = counter is not None
        if counter is not None and counter.locked_until is not None and counter.locked_until > now:
            wait = int((counter.locked_until - now).total_seconds()) + 1
            return RpcFailure(ErrorStatus.RATE_LIMITED, TEMPORARILY_LOCKED, wait)
        return None

    async def _address_counter(self, session: AsyncSession, user: User, client_ip: str | None) -> MfaAddressFailures | None:
        return await session.get(MfaAddressFailures, (user.id, _address_key(client_ip)))

    async def _make_room_for_login(self, session: AsyncSession, location_id: int, device_id: int, client_ip: str | None) -> None:
        """A new start replaces the live login of the same device, location and client
        address (and with it a mailed code or a challenge), and leaves those started from
        elsewhere alone, so that someone who knows only the device's public key cannot end
        its owner's login. Beyond max_live_logins the oldest goes."""
        await session.exec(self._make_room, params={"b_location": location_id, "b_device": device_id, "b_address": client_ip})

    async def _check_configured(self, session: AsyncSession, user: User, device: Device, method: MfaMethod) -> None:
        await self.factors[method].check_available(session, user, device)

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
        if login is None:
            raise _bad(LOGIN_NOT_FOUND)
        return login, await self._expired(session, login, states=states)

    async def finish(self, req: MfaFinishRequest) -> MfaFinishResult:
        if not is_key(req.reply_key):
            raise _bad("reply_key must be an X25519 public key")
        token = self._open(req.token_sealed)
        code = self._open(req.code_sealed)
        assert token is not None
        failure: _FactorFailed | None = None
        async with self.ctx.transaction() as session:
            login, user, location, device, counter = await self._finishing(session, token, req.client.ip)
            expired = await self._expired(session, login, states=(LoginState.PENDING, LoginState.APPROVED))
            if not expired:
                try:
                    psk = await self._verify_and_authorize(session, login, user, location, device, counter, code, req)
                except _FactorFailed as failed:
                    failure = failed
                    login = await self._count_failure(session, login.id, failure.reason, req.client.ip)
        if failure is not None:
            raise self._refused(login, failure.reason)
        if expired:
            metrics.LOGINS.labels(login.method, "expired").inc()
            raise _bad(LOGIN_NOT_FOUND)
        metrics.LOGINS.labels(login.method, "success").inc()
        metrics.LOGIN_SECONDS.labels(login.method).observe((self.ctx.clock.now() - login.created_at).total_seconds())
        return MfaFinishResult(psk_sealed=seal(req.reply_key, psk))

    async def _finishing(
        self, session: AsyncSession, token: str, client_ip: str | None
    ) -> tuple[MfaLogin, User, Location, Device, MfaAddressFailures | None]:
        """The login of `token` and its user, both locked, with its location, device and
        the user's failure counter for `client_ip`, in one statement."""
        row = (
            await session.exec(_FINISH_READ, params={"b_token": token_hash(token), "b_address": _address_key(client_ip)})
        ).first()
        if row is None:
            raise _bad(LOGIN_NOT_FOUND)
        return _FINISH_COLUMNS.split(row)  # type: ignore[return-value]

    async def _expired(self, session: AsyncSession, login: MfaLogin, *, states: tuple[str, ...]) -> bool:
        """Whether the locked `login` has run out (then it is marked so, to be committed
        before answering `login session not found`); not in one of `states`: not found."""
        if login.state not in states:
            raise _bad(LOGIN_NOT_FOUND)
        if login.expires_at <= self.ctx.clock.now():
            await session.exec(_EXPIRE_LOGIN, params={"b_id": login.id})
            return True
        return False

    async def _verify_and_authorize(
        self,
        session: AsyncSession,
        login: MfaLogin,
        user: User,
        location: Location,
        device: Device,
        counter: MfaAddressFailures | None,
        code: str | None,
        req: MfaFinishRequest,
    ) -> str:
        now = self.ctx.clock.now()
        method = MfaMethod[login.method.upper()]
        factor = self.factors[method]
        if factor.pending_message is not None:  # proven by another call: a phone, a browser
            if login.state != LoginState.APPROVED:
                raise RpcFailure(ErrorStatus.FAILED_PRECONDITION, factor.pending_message)
        else:
            if login.state != LoginState.PENDING:
                raise _bad(LOGIN_NOT_FOUND)
            if code is None:
                raise _bad(factor.missing_code)
            await self._take_attempt(session, login.id)
            if self._lockout(session, user, counter, req.client.ip, now) is not None:
                raise _FactorFailed("locked_out")
            if not user.is_active:
                raise _FactorFailed("factor_unavailable")
            await factor.verify(session, login, user, code, now)
            await self._clear_failures(session, user, req.client.ip)
        await session.exec(_FINISH_LOGIN, params={"b_id": login.id, "b_now": now})
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
        failure: _FactorFailed | None = None
        refusal: RpcFailure | None = None
        async with self.ctx.transaction() as session:
            login, expired = await self._live_login(session, token, states=(LoginState.PENDING,))
            if not expired:
                if login.method != method_name(MfaMethod.MOBILE_APPROVE):
                    raise _bad(WRONG_METHOD)
                try:
                    await self._take_attempt(session, login.id)
                    await self._approve(session, login, req.auth_pub_key, signature, req.client.ip)
                except _FactorFailed as failed:
                    failure = failed
                    login = await self._count_failure(session, login.id, failure.reason, req.client.ip)
                except RpcFailure as refused:  # answered once the attempt it took is committed
                    refusal = refused
        if failure is not None:
            raise self._refused(login, failure.reason)
        if refusal is not None:
            raise refusal
        if expired:
            metrics.LOGINS.labels(login.method, "expired").inc()
            raise _bad(LOGIN_NOT_FOUND)
        log.info("login %s approved by a mobile key", login.id)
        return Empty()

    async def _approve(
        self, session: AsyncSession, login: MfaLogin, auth_pub_key: str, signature: str, client_ip: str | None
    ) -> None:
        """Mark the locked `login` approved if `signature` is its challenge signed by
        `auth_pub_key`, a mobile key of the login's user."""
        key = (
            await session.exec(
                select(MobileKey).where(MobileKey.public_key == auth_pub_key, MobileKey.user_id == login.user_id)
            )
        ).first()
        if key is None:
            raise _bad(AUTH_KEY_NOT_OURS)  # not a key of this login's user
        user = await session.get(User, login.user_id)
        now = self.ctx.clock.now()
        if user is None or self._lockout(
            session, user, await self._address_counter(session, user, client_ip), client_ip, now
        ) is not None:
            raise _FactorFailed("locked_out")
        if login.challenge is None or not signature_valid(key.public_key, login.challenge, signature):
            raise _FactorFailed("bad_signature")
        login.state = LoginState.APPROVED
        login.challenge = None  # single use
        session.add(login)
        await self._clear_failures(session, user, client_ip)
        enqueue_notify(session, LoginApproved(login_id=login.id))

    async def token_status(self, req: TokenStatusRequest) -> TokenStatusResult:
        token = self._open(req.token_sealed)
        assert token is not None
        async with self.ctx.db.reader() as session:
            login = (await session.exec(select(MfaLogin).where(MfaLogin.token_hash == token_hash(token)))).first()
        if login is None or login.state not in LIVE_LOGIN_STATES or login.expires_at <= self.ctx.clock.now():
            raise RpcFailure(ErrorStatus.UNAUTHENTICATED, LOGIN_NOT_FOUND)
        return TokenStatusResult(login_id=str(login.id), method=login.method, state=login.state, expires_at=login.expires_at)

    # --- failures ---------------------------------------------------------------------------

    async def _take_attempt(self, session: AsyncSession, login_id: UUID) -> None:
        """Take one of the login's max_failed_attempts before its code or signature is
        checked, in the transaction that checks it and records the outcome. The login's
        row is locked by then (FOR UPDATE; SQLite's write lock), so racing requests on one
        login take turns, each sees the attempts of those before it, and none is answered
        before its attempt is committed: at most max_failed_attempts codes are ever
        checked. A login whose attempts are all taken fails without a check (audited as
        attempts_exhausted)."""
        taken = await session.exec(
            _TAKE_ATTEMPT, params={"b_id": login_id, "b_limit": self.ctx.settings.max_failed_attempts}
        )
        if taken.rowcount != 1:
            raise _FactorFailed(ATTEMPTS_EXHAUSTED)

    def _refused(self, login: MfaLogin, reason: str) -> RpcFailure:
        """The answer to a failed factor, once its failure is committed; it never says
        which part was wrong."""
        metrics.LOGINS.labels(login.method, reason).inc()
        if reason == ATTEMPTS_EXHAUSTED:
            log.info("MFA login %s refused: its attempts are all taken", login.id)
        else:
            log.info("MFA login %s failed (%s), attempt %s", login.id, reason, login.failed_attempts)
        return RpcFailure(ErrorStatus.UNAUTHENTICATED, UNAUTHORIZED)

    async def _audit_failure(
        self, session: AsyncSession, login: MfaLogin, reason: str, client_ip: str | None, user: User | None = None
    ) -> dict:
        location = await session.get(Location, login.location_id)
        device = await session.get(Device, login.device_id)
        user = user or await session.get(User, login.user_id)
        assert location is not None and device is not None and user is not None
        ids = names(location, device, user)
        enqueue_event(
            session,
            MfaFailed(**ids, login_id=login.id, method=login.method, reason=reason,  # type: ignore[arg-type]
                      failed_attempts=login.failed_attempts, client_ip=client_ip),
        )
        return ids

    async def _clear_failures(self, session: AsyncSession, user: User, client_ip: str | None) -> None:
        """A proven factor: the user's run of failures ends, and so does that address's.
        Statements only for what there is to clear, as read in this transaction: the
        user's counters, and the address's counter when `_lockout` found none (`finish`
        holds the user's row lock, which recording a failure takes first)."""
        if user.mfa_failures or user.mfa_locked_until is not None:
            await session.exec(update(User).where(col(User.id) == user.id).values(mfa_failures=0, mfa_locked_until=None))
        key = _address_key(client_ip)
        if session.info.get(ADDRESS_COUNTERS_READ, {}).get((user.id, key), True):
            await session.exec(
                delete(MfaAddressFailures).where(
                    col(MfaAddressFailures.user_id) == user.id, col(MfaAddressFailures.client_ip) == key
                )
            )

    async def _count_failure(self, session: AsyncSession, login_id: UUID, reason: str, client_ip: str | None) -> MfaLogin:
        """In the transaction that checked the factor: count its failure against the login
        (dead once all its attempts failed), the user's client address (locked out for a
        growing while after every max_failed_attempts in a row from it) and the user (locked
        until an administrator unlocks after mfa_hard_lock_failures in a row from anywhere),
        and audit it. A login refused for its attempts was not checked: only audited."""
        limit = self.ctx.settings.max_failed_attempts
        now = self.ctx.clock.now()
        login = (await session.exec(select(MfaLogin).where(MfaLogin.id == login_id).with_for_update())).one()
        if reason == ATTEMPTS_EXHAUSTED:
            await self._audit_failure(session, login, reason, client_ip)
            return login
        user = (await session.exec(select(User).where(User.id == login.user_id).with_for_update())).one()
        login.failed_attempts += 1
        login_dead = login.state == LoginState.PENDING and login.failed_attempts >= limit
        if login_dead:
            login.state = LoginState.FAILED
            for field, value in FORGOTTEN_WHEN_ENDED.items():
                setattr(login, field, value)
        session.add(login)
        locked_until = None
        hard_locked = False
        if reason != "locked_out":
            # the user row is locked above, so this read-modify-write of the user's
            # counters is serialised on PostgreSQL too
            key = _address_key(client_ip)
            counter = await session.get(MfaAddressFailures, (user.id, key)) or MfaAddressFailures(
                user_id=user.id, client_ip=key  # type: ignore[arg-type]
            )
            counter.failures += 1
            if counter.failures % limit == 0:
                lock_s = min(FIRST_USER_LOCK_S * 2 ** (counter.failures // limit - 1), MAX_USER_LOCK_S)
                locked_until = now + timedelta(seconds=lock_s)
                counter.locked_until = locked_until
            session.add(counter)
            user.mfa_failures += 1
            hard_locked = user.mfa_failures == self.ctx.settings.mfa_hard_lock_failures
            session.add(user)
        ids = await self._audit_failure(session, login, reason, client_ip, user)
        if login_dead or locked_until is not None or hard_locked:
            enqueue_event(
                session,
                MfaLocked(**ids, login_id=login.id, method=login.method,  # type: ignore[arg-type]
                          failed_attempts=login.failed_attempts, login_dead=login_dead,
                          user_locked_until=locked_until, hard_locked=hard_locked, client_ip=client_ip),
            )
        return login

    async def expire_logins(self) -> int:
        """Close logins past their expiry and drop old ones: finished ones after a week,
        the others (expired, replaced, failed: what anyone who knows a device's public key
        can make) after an hour, so that starts cannot grow the database without bound.
        Their story stays in the audit trail."""
        now = self.ctx.clock.now()
        async with self.ctx.transaction() as session:
            result = await session.exec(
                update(MfaLogin)
                .where(col(MfaLogin.state).in_(LIVE_LOGIN_STATES), col(MfaLogin.expires_at) <= now)
                .values(state=LoginState.EXPIRED, **FORGOTTEN_WHEN_ENDED)
            )
            unfinished_retention = max(
                UNFINISHED_LOGIN_RETENTION, timedelta(seconds=self.ctx.settings.email_limit_window_s)  # the mail budget counts them
            )
            await session.exec(
                delete(MfaLogin).where(
                    col(MfaLogin.state).not_in(LIVE_LOGIN_STATES),
                    col(MfaLogin.created_at) < now - LOGIN_RETENTION,
                )
            )
            await session.exec(
                delete(MfaLogin).where(
                    col(MfaLogin.state).not_in((*LIVE_LOGIN_STATES, LoginState.FINISHED)),
                    col(MfaLogin.created_at) < now - unfinished_retention,
                )
            )
        return result.rowcount or 0
