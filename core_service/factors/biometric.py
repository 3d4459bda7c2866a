"""Biometric (method 3): the phone signs the challenge of its own login with the key it
registered for this very device."""
from __future__ import annotations

from datetime import datetime

from sqlmodel import select
from sqlmodel.ext.asyncio.session import AsyncSession

from core_service.factors.base import Factor, FactorFailed, bad_request
from core_service.factors.challenge import new_challenge, signature_valid
from core_service.models import Device, MfaLogin, MobileKey, User
from schemas.common import MfaMethod

NOT_AVAILABLE_FOR_DEVICE = "Select MFA method not available for the device."


class BiometricFactor(Factor):
    method = MfaMethod.BIOMETRIC
    missing_code = "Challenge not found in request"

    async def check_available(self, session: AsyncSession, user: User, device: Device) -> None:
        if (await session.exec(select(MobileKey.id).where(MobileKey.device_id == device.id))).first() is None:
            raise bad_request(NOT_AVAILABLE_FOR_DEVICE)

    def prepare(self, login: MfaLogin) -> None:
        login.challenge = new_challenge()

    async def verify(self, session: AsyncSession, login: MfaLogin, user: User, code: str, now: datetime) -> None:
        key = (await session.exec(select(MobileKey).where(MobileKey.device_id == login.device_id))).first()
        if key is None or login.challenge is None:
            raise FactorFailed("factor_unavailable")
        if not signature_valid(key.public_key, login.challenge, code):
            raise FactorFailed("bad_signature")
