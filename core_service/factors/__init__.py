"""The second factors, one unit each behind one interface (`Factor`): TOTP, emailed
codes, the company's OpenID provider, a phone's biometric signature, a phone approving a
desktop. core_service.mfa runs the login lifecycle and asks the unit of the login's
method what only that factor knows."""
from __future__ import annotations

from core_service.context import CoreContext
from core_service.factors.base import Factor, FactorFailed
from core_service.factors.biometric import BiometricFactor
from core_service.factors.email import EmailFactor
from core_service.factors.mobile import MobileApproveFactor
from core_service.factors.oidc import OidcFactor
from core_service.factors.totp import TotpFactor
from core_service.mailer import Mailer
from core_service.oidc import RelyingParty
from schemas.common import MfaMethod


def build_factors(ctx: CoreContext, mailer: Mailer | None) -> dict[MfaMethod, Factor]:
    units: list[Factor] = [
        TotpFactor(ctx.vault),
        EmailFactor(ctx, mailer),
        OidcFactor(ctx, RelyingParty(ctx)),
        BiometricFactor(),
        MobileApproveFactor(),
    ]
    return {unit.method: unit for unit in units}


__all__ = ["Factor", "FactorFailed", "build_factors"]
