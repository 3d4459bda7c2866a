"""Emailed codes (method 1): 6 digits from a CSPRNG, stored as a keyed hash bound to their
login, mailed after the login is committed, a few per user per window."""
from __future__ import annotations

import hmac
import logging
import secrets
from datetime import datetime, timedelta

from sqlmodel import col, select, update
from sqlmodel.ext.asyncio.session import AsyncSession

from core_service import metrics
from core_service.context import CoreContext
from core_service.factors.base import Factor, FactorFailed, METHOD_NOT_AVAILABLE, bad_request
from core_service.mailer import MailError, Mailer
from core_service.models import Device, Location, MfaLogin, User
from core_service.outbox import enqueue_event
from core_service.sessions import names
from schemas.common import LoginState, MfaMethod
from schemas.events import MfaEmailSent, MfaFailed
from schemas.rpc import ErrorStatus, RpcFailure

log = logging.getLogger(__name__)


def masked_address(address: str) -> str:
    local, _, domain = address.partition("@")
    return f"{local[:1]}***@{domain}"


class EmailFactor(Factor):
    method = MfaMethod.EMAIL
    missing_code = "email MFA code not provided"

    def __init__(self, ctx: CoreContext, mailer: Mailer | None) -> None:
        self.ctx = ctx
        self.mailer = mailer

    async def check_available(self, session: AsyncSession, user: User, device: Device) -> None:
        if not (user.email_mfa_enabled and self.mailer is not None):
            raise bad_request(METHOD_NOT_AVAILABLE)

    async def before_start(self, session: AsyncSession, user: User, now: datetime) -> None:
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

    def prepare(self, login: MfaLogin) -> str:
        code = f"{secrets.randbelow(10**6):06d}"
        login.email_code_hash = self.ctx.vault.code_hash(login.id, code)
        return code

    async def deliver(
        self, login: MfaLogin, location: Location, device: Device, user: User, secret: str, client_ip: str | None
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
            f"Your code: {secret}\n\n"
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
            metrics.LOGINS.labels("email", "email_unavailable").inc()
            raise RpcFailure(ErrorStatus.UNAVAILABLE, f"cannot send the MFA email: {exc}") from None
        async with self.ctx.transaction() as session:
            enqueue_event(
                session,
                MfaEmailSent(**names(location, device, user), login_id=login.id, to=masked_address(user.email),
                             expires_at=login.expires_at),
            )

    async def verify(self, session: AsyncSession, login: MfaLogin, user: User, code: str, now: datetime) -> None:
        expected = login.email_code_hash or ""
        if not hmac.compare_digest(expected, self.ctx.vault.code_hash(login.id, code.strip())):
            raise FactorFailed("wrong_code")
