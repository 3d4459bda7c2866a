"""TOTP (method 0): RFC 6238, each time step accepted once per user."""
from __future__ import annotations

from datetime import datetime

from sqlalchemy import bindparam, update
from sqlmodel.ext.asyncio.session import AsyncSession

from core_service import totp
from core_service.db import prepared
from core_service.factors.base import Factor, FactorFailed, METHOD_NOT_AVAILABLE, bad_request
from core_service.keys import Vault
from core_service.models import Device, MfaLogin, User
from schemas.common import MfaMethod


_USERS = User.__table__
# Each time step is accepted once per user, atomically: of two logins racing with one
# code, exactly one moves the step forward.
_CLAIM_STEP = prepared(
    update(_USERS)
    .where(_USERS.c.id == bindparam("b_user"), _USERS.c.totp_last_step.is_(None) | (_USERS.c.totp_last_step < bindparam("b_step")))
    .values(totp_last_step=bindparam("b_step"))
)


class TotpFactor(Factor):
    method = MfaMethod.TOTP
    missing_code = "TOTP code not provided"

    def __init__(self, vault: Vault) -> None:
        self.vault = vault

    async def check_available(self, session: AsyncSession, user: User, device: Device) -> None:
        if user.totp_secret_enc is None:
            raise bad_request(METHOD_NOT_AVAILABLE)

    async def verify(self, session: AsyncSession, login: MfaLogin, user: User, code: str, now: datetime) -> None:
        if user.totp_secret_enc is None:
            raise FactorFailed("factor_unavailable")
        step = totp.matching_step(self.vault.decrypt(user.totp_secret_enc), code, now)
        if step is None:
            raise FactorFailed("wrong_code")
        claimed = await session.exec(_CLAIM_STEP, params={"b_user": user.id, "b_step": step})
        if claimed.rowcount != 1:
            raise FactorFailed("replayed_code")
