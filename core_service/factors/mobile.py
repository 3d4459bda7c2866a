"""Mobile approve (method 4): a phone of the same user signs the desktop login's
challenge (`finish_remote`); the desktop's finish then only collects the PSK."""
from __future__ import annotations

from sqlmodel import select
from sqlmodel.ext.asyncio.session import AsyncSession

from core_service.factors.base import Factor, METHOD_NOT_AVAILABLE, bad_request
from core_service.factors.challenge import new_challenge
from core_service.models import Device, MfaLogin, MobileKey, User
from schemas.common import MfaMethod


class MobileApproveFactor(Factor):
    method = MfaMethod.MOBILE_APPROVE
    pending_message = "mobile approval not completed yet"

    async def check_available(self, session: AsyncSession, user: User, device: Device) -> None:
        if (await session.exec(select(MobileKey.id).where(MobileKey.user_id == user.id))).first() is None:
            raise bad_request(METHOD_NOT_AVAILABLE)

    def prepare(self, login: MfaLogin) -> None:
        login.challenge = new_challenge()
