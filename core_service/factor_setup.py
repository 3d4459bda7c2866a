"""Setting up a user's second factor: the same steps, rules and events whether an admin
does it (`wgmfa admin totp|email`) or the user during enrollment."""
from __future__ import annotations

from sqlmodel.ext.asyncio.session import AsyncSession

from core_service import totp
from core_service.context import CoreContext
from core_service.models import User
from core_service.outbox import enqueue_event
from schemas.events import TotpEnrolled


def begin_totp(ctx: CoreContext, session: AsyncSession, user: User, *, actor: str | None = None) -> str:
    """A new TOTP secret, pending until confirmed; returns it (the caller shows it once).
    The active factor (if any) keeps working until the new one is confirmed."""
    secret = totp.new_secret()
    user.totp_pending_secret_enc = ctx.vault.encrypt(secret)
    session.add(user)
    enqueue_event(session, TotpEnrolled(user_id=user.id, username=user.username, confirmed=False, actor=actor))  # type: ignore[arg-type]
    return secret


def confirm_totp(ctx: CoreContext, session: AsyncSession, user: User, code: str, *, actor: str | None = None) -> bool:
    """Activate the pending secret if `code` matches it; the confirming step is used up,
    so that code cannot log in afterwards. False: the code does not match."""
    assert user.totp_pending_secret_enc is not None
    secret = ctx.vault.decrypt(user.totp_pending_secret_enc)
    step = totp.matching_step(secret, code, ctx.clock.now())
    if step is None:
        return False
    user.totp_secret_enc = user.totp_pending_secret_enc
    user.totp_pending_secret_enc = None
    user.totp_last_step = step
    session.add(user)
    enqueue_event(session, TotpEnrolled(user_id=user.id, username=user.username, confirmed=True, actor=actor))  # type: ignore[arg-type]
    return True


def set_email_mfa(session: AsyncSession, user: User, enabled: bool) -> None:
    user.email_mfa_enabled = enabled
    session.add(user)


def has_factor(user: User) -> bool:
    """A factor the user can log in with today (a phone key comes on top of one)."""
    return user.totp_secret_enc is not None or user.email_mfa_enabled
