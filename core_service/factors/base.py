"""The interface every second factor implements. The login lifecycle (tokens, budgets,
locking, authorization) lives in core_service.mfa; a factor only says whether a user has
it, what a new login needs, and whether a proof is good."""
from __future__ import annotations

import hashlib
from datetime import datetime

from sqlmodel.ext.asyncio.session import AsyncSession

from core_service.models import Device, Location, MfaLogin, User
from runtime.errors import WgmfaError
from schemas.common import MfaMethod
from schemas.rpc import ErrorStatus, RpcFailure

METHOD_NOT_AVAILABLE = "selected MFA method not available"


def token_hash(token: str) -> str:
    """How a bearer value (a login's token, an OIDC state or browser secret) is stored
    and found."""
    return hashlib.sha256(token.encode()).hexdigest()


def bad_request(message: str) -> RpcFailure:
    return RpcFailure(ErrorStatus.INVALID_ARGUMENT, message)


class FactorFailed(WgmfaError):
    """Raised by a factor when the proof was wrong: counted against the login and the user."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class Factor:
    method: MfaMethod
    # finish without a code: this message (Defguard's string per method)
    missing_code: str = ""
    # Factors proven by another call (a phone's approval, the browser's OIDC callback) mark
    # the login approved; until then finish answers 428 with this message.
    pending_message: str | None = None

    async def check_available(self, session: AsyncSession, user: User, device: Device) -> None:
        """Raise RpcFailure unless this user (and device) can use the factor."""
        raise bad_request(METHOD_NOT_AVAILABLE)

    async def before_start(self, session: AsyncSession, user: User, now: datetime) -> None:
        """Refuse a start the factor cannot afford (e.g. a mail budget)."""

    def prepare(self, login: MfaLogin) -> str | None:
        """Fill the new login's factor state; a secret returned here is delivered once
        the login is committed."""
        return None

    async def deliver(
        self, login: MfaLogin, location: Location, device: Device, user: User, secret: str, client_ip: str | None
    ) -> None:
        """Send the secret `prepare` made (after the commit: no transaction over I/O)."""

    async def verify(self, session: AsyncSession, login: MfaLogin, user: User, code: str, now: datetime) -> None:
        """Raise FactorFailed unless `code` proves the factor."""
        raise FactorFailed("factor_unavailable")
