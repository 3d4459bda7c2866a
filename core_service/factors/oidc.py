"""External MFA (method 2): the company's OpenID provider, in the user's browser.

The app starts a login and opens <proxy>/openid/mfa?token=…; that page asks for the
authorization URL (`auth_url`), the provider sends the browser back with a code, and the
callback page hands it over (`callback`). A good callback approves the login; the app's
polling finish then collects the PSK. Everything of the flow in flight (state, nonce,
PKCE verifier, the browser binding) is on the login row, so any proxy and any core can
take any step; the browser holds an encrypted cookie that only a core can open.
"""
from __future__ import annotations

import hmac
import json
import logging
from uuid import UUID

from authlib.common.security import generate_token
from sqlmodel import col, select
from sqlmodel.ext.asyncio.session import AsyncSession

from core_service import metrics
from core_service.context import CoreContext
from core_service.factors.base import METHOD_NOT_AVAILABLE, Factor, bad_request, token_hash
from core_service.keys import OIDC_COOKIE
from core_service.models import Device, Location, MfaLogin, User
from core_service.oidc import (
    NOT_CONFIGURED,
    Identity,
    ProviderRejected,
    ProviderUnreachable,
    RelyingParty,
    bind_or_match,
    load_provider,
    provider_configured,
)
from core_service.outbox import enqueue_event
from core_service.sessions import names
from schemas.sealing import SealError, is_key, seal
from schemas.common import LoginState, MfaMethod, method_name
from schemas.events import MfaFailed
from schemas.rpc import Empty, ErrorStatus, OidcAuthUrlRequest, OidcAuthUrlResult, OidcCallbackRequest, RpcFailure

log = logging.getLogger(__name__)

LOGIN_NOT_FOUND = "login session not found"
WRONG_METHOD = "invalid MFA method"
COOKIE_MISSING = "OIDC cookie not found: finish the login in the browser that started it"
NOT_THIS_BROWSER = "OIDC state does not belong to this browser"
STATE_UNKNOWN = "OIDC state not found or already used"
MAX_COOKIE_AGE_S = 86_400
STATE_CHARS = 43  # of 62 symbols: 256 bits


def _unauthenticated(message: str) -> RpcFailure:
    return RpcFailure(ErrorStatus.UNAUTHENTICATED, message)


class OidcFactor(Factor):
    method = MfaMethod.OIDC
    pending_message = "OIDC authentication not completed yet"

    def __init__(self, ctx: CoreContext, relying_party: RelyingParty) -> None:
        self.ctx = ctx
        self.relying_party = relying_party

    async def check_available(self, session: AsyncSession, user: User, device: Device) -> None:
        if not await provider_configured(session):
            raise bad_request(METHOD_NOT_AVAILABLE)

    def _open(self, sealed: str | None, message: str) -> str | None:
        if sealed is None:
            return None
        try:
            return self.ctx.vault.open_sealed(sealed)
        except SealError:
            raise bad_request(message) from None

    # --- the authorization request ---------------------------------------------------------

    async def auth_url(self, req: OidcAuthUrlRequest) -> OidcAuthUrlResult:
        if not is_key(req.reply_key):
            raise bad_request("reply_key must be an X25519 public key")
        token = self._open(req.token_sealed, "invalid token")
        assert token is not None
        state, nonce, verifier, browser = (generate_token(n) for n in (STATE_CHARS, 32, 64, STATE_CHARS))
        now = self.ctx.clock.now()
        async with self.ctx.transaction() as session:
            login = (
                await session.exec(
                    select(MfaLogin).where(MfaLogin.token_hash == token_hash(token)).with_for_update()
                )
            ).first()
            if login is None or login.state != LoginState.PENDING or login.expires_at <= now:
                raise bad_request(LOGIN_NOT_FOUND)
            if login.method != method_name(MfaMethod.OIDC):
                raise bad_request(WRONG_METHOD)
            provider = await load_provider(session)
            if provider is None:
                raise bad_request(NOT_CONFIGURED)
            # A new request (the page reloaded) replaces the previous one: one state live.
            login.oidc_state_hash = token_hash(state)
            login.oidc_browser_hash = token_hash(browser)
            login.oidc_nonce = nonce
            login.oidc_verifier_enc = self.ctx.vault.encrypt(verifier)
            session.add(login)
        url = await self.relying_party.authorization_url(provider, state=state, nonce=nonce, code_verifier=verifier)
        cookie = self.ctx.vault.seal_cookie(OIDC_COOKIE, json.dumps({"login": str(login.id), "browser": browser, "state": token_hash(state)}))
        max_age = int((login.expires_at - now).total_seconds())
        return OidcAuthUrlResult(
            url_sealed=seal(req.reply_key, url),
            button_display_name=provider.display_name,
            cookie_sealed=seal(req.reply_key, cookie),
            cookie_max_age_s=min(max(max_age, 1), MAX_COOKIE_AGE_S),
        )

    # --- the callback ----------------------------------------------------------------------

    async def callback(self, req: OidcCallbackRequest) -> Empty:
        state = self._open(req.state_sealed, STATE_UNKNOWN)
        code = self._open(req.code_sealed, "invalid code")
        cookie = self._open(req.cookie_sealed, COOKIE_MISSING)
        assert state is not None
        if not cookie:
            raise _unauthenticated(COOKIE_MISSING)
        binding = self._binding(cookie)
        state_hash = token_hash(state)
        if binding is None or not hmac.compare_digest(binding["state"], state_hash):
            raise _unauthenticated(NOT_THIS_BROWSER)
        now = self.ctx.clock.now()
        failure: tuple[str, str] | None = None
        async with self.ctx.transaction() as session:
            login = (
                await session.exec(select(MfaLogin).where(MfaLogin.oidc_state_hash == state_hash).with_for_update())
            ).first()
            if login is None:
                raise bad_request(STATE_UNKNOWN)
            if str(login.id) != binding["login"] or not hmac.compare_digest(
                login.oidc_browser_hash or "", token_hash(binding["browser"])
            ):
                raise _unauthenticated(NOT_THIS_BROWSER)
            if login.state != LoginState.PENDING or login.expires_at <= now:
                raise bad_request(LOGIN_NOT_FOUND)
            nonce, verifier_enc = login.oidc_nonce, login.oidc_verifier_enc
            # single use, whatever comes next
            login.oidc_state_hash = login.oidc_browser_hash = login.oidc_nonce = login.oidc_verifier_enc = None
            session.add(login)
            provider = await load_provider(session)
            if provider is None:
                failure = ("oidc_not_configured", NOT_CONFIGURED)
            elif req.error:
                failure = ("oidc_provider_refused", f"the provider refused the login: {req.error}")
            elif (provider.iss_parameter_supported and req.iss is None) or (
                req.iss is not None and req.iss != provider.issuer
            ):
                # RFC 9207: a response from another issuer (a mix-up) is rejected
                failure = ("oidc_wrong_issuer", "the response does not come from the configured provider")
            elif not code:
                failure = ("oidc_no_code", "the provider sent no authorization code")
            elif nonce is None or verifier_enc is None:
                failure = ("oidc_no_request", STATE_UNKNOWN)
            if failure is not None:
                await self._fail(session, login, failure[0], req.client.ip)
        if failure is not None:
            raise _unauthenticated(failure[1])
        assert provider is not None and nonce is not None and verifier_enc is not None and code is not None
        try:
            identity, refreshed_jwks = await self.relying_party.identity(
                provider, code=code, code_verifier=self.ctx.vault.decrypt(verifier_enc), nonce=nonce
            )
        except ProviderUnreachable as exc:
            # The login stays pending: the user may try again from the page until it expires.
            log.warning("OIDC login %s: %s", login.id, exc)
            raise RpcFailure(ErrorStatus.UNAVAILABLE, f"the identity provider is unavailable: {exc}") from None
        except ProviderRejected as rejected:
            log.info("OIDC login %s rejected: %s", login.id, rejected.detail)
            await self._fail_by_id(login.id, rejected.reason, req.client.ip)
            raise _unauthenticated(rejected.detail) from None
        return await self._approve(login.id, identity, refreshed_jwks, req.client.ip)

    def _binding(self, cookie: str) -> dict[str, str] | None:
        opened = self.ctx.vault.open_cookie(OIDC_COOKIE, cookie)
        if opened is None:
            return None
        try:
            binding = json.loads(opened)
        except ValueError:
            return None
        if not isinstance(binding, dict) or not all(isinstance(binding.get(k), str) for k in ("login", "browser", "state")):
            return None
        return binding

    async def _approve(self, login_id: UUID, identity: Identity, refreshed_jwks: str | None, client_ip: str | None) -> Empty:
        now = self.ctx.clock.now()
        async with self.ctx.transaction() as session:
            login = (await session.exec(select(MfaLogin).where(MfaLogin.id == login_id).with_for_update())).one()
            if login.state != LoginState.PENDING or login.expires_at <= now:
                raise bad_request(LOGIN_NOT_FOUND)
            if refreshed_jwks is not None:
                provider = await load_provider(session)
                if provider is not None:
                    provider.jwks = refreshed_jwks
                    session.add(provider)
            user = (await session.exec(select(User).where(User.id == login.user_id).with_for_update())).one()
            holder = (
                await session.exec(
                    select(User.id).where(
                        User.oidc_issuer == identity.issuer, User.oidc_subject == identity.subject, col(User.id) != user.id
                    )
                )
            ).first()
            reason = bind_or_match(user, identity, bound_elsewhere=holder is not None) if user.is_active else "user_disabled"
            if reason is None:
                login.state = LoginState.APPROVED
                session.add(login)
                session.add(user)
            else:
                await self._fail(session, login, reason, client_ip)
        if reason is not None:
            log.info("OIDC login %s rejected: %s", login_id, reason)
            raise _unauthenticated("this identity cannot complete the login of this device's user")
        log.info("OIDC login %s approved", login_id)
        return Empty()

    async def _fail(self, session: AsyncSession, login: MfaLogin, reason: str, client_ip: str | None) -> None:
        """The login ends: no finish can succeed, the app is told to start again."""
        login.state = LoginState.FAILED
        login.oidc_state_hash = login.oidc_browser_hash = login.oidc_nonce = login.oidc_verifier_enc = None
        session.add(login)
        location = await session.get(Location, login.location_id)
        device = await session.get(Device, login.device_id)
        user = await session.get(User, login.user_id)
        assert location is not None and device is not None and user is not None
        enqueue_event(
            session,
            MfaFailed(**names(location, device, user), login_id=login.id, method="oidc", reason=reason,
                      failed_attempts=login.failed_attempts, client_ip=client_ip),
        )
        metrics.LOGINS.labels("oidc", reason).inc()

    async def _fail_by_id(self, login_id: UUID, reason: str, client_ip: str | None) -> None:
        async with self.ctx.transaction() as session:
            login = (await session.exec(select(MfaLogin).where(MfaLogin.id == login_id).with_for_update())).one()
            if login.state == LoginState.PENDING:
                await self._fail(session, login, reason, client_ip)

