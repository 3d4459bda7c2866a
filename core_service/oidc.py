"""The company's OpenID provider, as a relying party: its configuration (one per
deployment, read from its discovery document), the authorization code exchange with PKCE,
and ID token validation. OAuth is Authlib's and JOSE is joserfc's; this module only
chooses what they must check.

The client secret never leaves the core: the token endpoint is called from here.
"""
from __future__ import annotations

import ipaddress
import json
import logging
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlparse

import httpx2
from authlib.integrations.httpx_client import AsyncOAuth2Client, OAuthError
from authlib.oidc.core import CodeIDToken, UserInfo
from joserfc import jwt
from joserfc.errors import InvalidKeyIdError, JoseError
from joserfc.jwk import KeySet
from sqlmodel import col, select
from sqlmodel.ext.asyncio.session import AsyncSession

from core_service.context import CoreContext
from core_service.models import OidcProvider, User
from core_service.outbox import enqueue_event
from runtime.errors import Invalid, Unavailable
from schemas.sealing import SealError
from schemas.events import OidcProviderSet
from schemas.rpc import ErrorStatus, OidcProviderInfo, OidcProviderSetRequest, RpcFailure, actor_of

log = logging.getLogger(__name__)

# Asymmetric algorithms only: never `none`, never HS* (whose key would be the client
# secret, or worse, a public key read as one).
ALLOWED_ALGORITHMS = ("RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512", "EdDSA")
LEEWAY_S = 120
NOT_CONFIGURED = "no OpenID provider is configured: `wgmfa admin oidc set` first"


class ProviderUnreachable(Unavailable):
    """Raised when the provider did not answer (in time), or answered with a server error:
    the login stays as it was."""


class ProviderRejected(Invalid):
    """Raised when the provider refused, or what it sent does not validate: the login
    fails."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


@dataclass
class Identity:
    issuer: str
    subject: str
    email: str | None
    email_verified: bool


async def load_provider(session: AsyncSession) -> OidcProvider | None:
    return (await session.exec(select(OidcProvider).order_by(col(OidcProvider.id)))).first()


async def provider_configured(session: AsyncSession) -> bool:
    """Whether locations may use external MFA."""
    return await load_provider(session) is not None


def provider_info(provider: OidcProvider) -> OidcProviderInfo:
    return OidcProviderInfo(
        issuer=provider.issuer,
        client_id=provider.client_id,
        display_name=provider.display_name,
        scopes=provider.scopes,
        redirect_uri=provider.redirect_uri,
        authorization_endpoint=provider.authorization_endpoint,
        token_endpoint=provider.token_endpoint,
        userinfo_endpoint=provider.userinfo_endpoint,
        jwks_uri=provider.jwks_uri,
        signing_algs=provider.signing_algs,
        iss_parameter_supported=provider.iss_parameter_supported,
        updated_at=provider.updated_at,
    )


def check_provider_url(url: str, what: str) -> None:
    """https, except on this machine's loopback (a provider for tests or a local proxy)."""
    parsed = urlparse(url)
    if parsed.scheme == "https" and parsed.hostname:
        return
    if parsed.scheme == "http" and parsed.hostname:
        host = parsed.hostname
        try:
            loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
        except ValueError:
            loopback = False
        if loopback:
            return
    raise RpcFailure(ErrorStatus.INVALID_ARGUMENT, f"{what} must be an https URL (http only on loopback), got {url!r}")


class RelyingParty:
    def __init__(self, ctx: CoreContext) -> None:
        self.ctx = ctx

    @property
    def timeout_s(self) -> float:
        return self.ctx.settings.oidc_timeout_s

    # --- configuration --------------------------------------------------------------------

    async def _get_json(self, http: httpx2.AsyncClient, url: str, what: str) -> Any:
        try:
            response = await http.get(url)
        except httpx2.HTTPError as exc:
            raise RpcFailure(ErrorStatus.UNAVAILABLE, f"cannot reach the provider's {what} at {url}: {exc or type(exc).__name__}") from None
        if response.status_code != 200:
            raise RpcFailure(ErrorStatus.INVALID_ARGUMENT, f"the provider's {what} at {url} answered HTTP {response.status_code}")
        try:
            return response.json()
        except ValueError:
            raise RpcFailure(ErrorStatus.INVALID_ARGUMENT, f"the provider's {what} at {url} is not JSON") from None

    async def discover(self, req: OidcProviderSetRequest, client_secret: str) -> OidcProvider:
        """Read and check the discovery document and key set; refuse, with the reason, a
        provider that cannot do the code flow with PKCE S256 and asymmetric ID tokens."""
        check_provider_url(req.issuer, "the issuer")
        check_provider_url(req.redirect_uri, "the redirect URI")
        if "openid" not in req.scopes.split():
            raise RpcFailure(ErrorStatus.INVALID_ARGUMENT, "the scopes must include openid")
        async with httpx2.AsyncClient(timeout=self.timeout_s) as http:
            document = await self._get_json(http, f"{req.issuer.rstrip('/')}/.well-known/openid-configuration",
                                            "discovery document")
            if not isinstance(document, dict):
                raise RpcFailure(ErrorStatus.INVALID_ARGUMENT, "the discovery document is not a JSON object")
            # OpenID Connect Discovery 4.3: the issuer must be exactly the one asked for
            if document.get("issuer") != req.issuer:
                raise RpcFailure(ErrorStatus.INVALID_ARGUMENT,
                                 f"the discovery document names issuer {document.get('issuer')!r}, not {req.issuer!r}")
            missing = [k for k in ("authorization_endpoint", "token_endpoint", "jwks_uri") if not document.get(k)]
            if missing:
                raise RpcFailure(ErrorStatus.INVALID_ARGUMENT, f"the discovery document lacks {', '.join(missing)}")
            if "code" not in document.get("response_types_supported", []):
                raise RpcFailure(ErrorStatus.INVALID_ARGUMENT, "the provider does not offer the authorization code flow")
            if "S256" not in document.get("code_challenge_methods_supported", []):
                raise RpcFailure(ErrorStatus.INVALID_ARGUMENT, "the provider does not offer PKCE with S256")
            methods = document.get("token_endpoint_auth_methods_supported", ["client_secret_basic"])
            if "client_secret_basic" not in methods and "client_secret_post" not in methods:
                raise RpcFailure(ErrorStatus.INVALID_ARGUMENT, "the provider takes no client secret at its token endpoint")
            algorithms = [a for a in document.get("id_token_signing_alg_values_supported", ["RS256"]) if a in ALLOWED_ALGORITHMS]
            if not algorithms:
                raise RpcFailure(ErrorStatus.INVALID_ARGUMENT,
                                 f"the provider signs ID tokens with none of {', '.join(ALLOWED_ALGORITHMS)}")
            for key in ("authorization_endpoint", "token_endpoint", "jwks_uri", "userinfo_endpoint"):
                if document.get(key):
                    check_provider_url(document[key], f"the provider's {key}")
            jwks = await self._get_json(http, document["jwks_uri"], "key set")
        _import_keys(jwks)
        return OidcProvider(
            issuer=req.issuer,
            client_id=req.client_id,
            client_secret_enc=self.ctx.vault.encrypt(client_secret),
            display_name=req.display_name,
            scopes=req.scopes,
            redirect_uri=req.redirect_uri,
            authorization_endpoint=document["authorization_endpoint"],
            token_endpoint=document["token_endpoint"],
            userinfo_endpoint=document.get("userinfo_endpoint"),
            jwks_uri=document["jwks_uri"],
            jwks=json.dumps(jwks),
            signing_algs=algorithms,
            iss_parameter_supported=document.get("authorization_response_iss_parameter_supported") is True,
            updated_at=self.ctx.clock.now(),
        )

    # --- the flow ---------------------------------------------------------------------------

    def _client(self, provider: OidcProvider) -> AsyncOAuth2Client:
        return AsyncOAuth2Client(
            client_id=provider.client_id,
            client_secret=self.ctx.vault.decrypt(provider.client_secret_enc),
            scope=provider.scopes,
            redirect_uri=provider.redirect_uri,
            code_challenge_method="S256",
            timeout=self.timeout_s,
        )

    async def authorization_url(self, provider: OidcProvider, *, state: str, nonce: str, code_verifier: str) -> str:
        """The URL (no request is made) with the code challenge (S256), state and nonce."""
        async with self._client(provider) as client:
            url, _ = client.create_authorization_url(
                provider.authorization_endpoint, state=state, nonce=nonce, code_verifier=code_verifier
            )
        return url

    async def identity(self, provider: OidcProvider, *, code: str, code_verifier: str, nonce: str) -> tuple[Identity, str | None]:
        """Exchange the code and validate the ID token; (identity, the key set if it had
        to be refreshed)."""
        async with self._client(provider) as client:
            try:
                token = await client.fetch_token(provider.token_endpoint, code=code, code_verifier=code_verifier)
            except OAuthError as exc:
                raise ProviderRejected("oidc_token_refused", f"the provider refused the code: {exc.error}") from None
            except httpx2.TransportError as exc:
                raise ProviderUnreachable(f"cannot reach the provider's token endpoint: {exc or type(exc).__name__}") from None
            except httpx2.HTTPStatusError as exc:
                status = exc.response.status_code
                if status >= 500:  # an outage, not a refusal: the login may be tried again
                    raise ProviderUnreachable(f"the provider's token endpoint answered HTTP {status}") from None
                raise ProviderRejected("oidc_token_refused", f"the provider's token endpoint answered HTTP {status}") from None
            except ValueError:
                raise ProviderRejected("oidc_token_refused", "the provider's token response is not valid") from None
            id_token = token.get("id_token")
            if not isinstance(id_token, str):
                raise ProviderRejected("oidc_bad_id_token", "the provider sent no ID token")
            claims, refreshed = await self._validated_claims(provider, id_token, nonce, token.get("access_token"))
            email, verified = claims.get("email"), claims.get("email_verified") is True
            if email is None and provider.userinfo_endpoint and token.get("access_token"):
                info = await self._userinfo(client, provider, claims["sub"])
                email, verified = info.get("email"), info.get("email_verified") is True
        return Identity(issuer=provider.issuer, subject=claims["sub"], email=email if isinstance(email, str) else None,
                        email_verified=verified), refreshed

    async def _userinfo(self, client: AsyncOAuth2Client, provider: OidcProvider, subject: str) -> UserInfo:
        try:
            response = await client.get(provider.userinfo_endpoint)
        except httpx2.TransportError as exc:
            raise ProviderUnreachable(f"cannot reach the provider's userinfo endpoint: {exc or type(exc).__name__}") from None
        if response.status_code >= 500:
            raise ProviderUnreachable(f"the provider's userinfo endpoint answered HTTP {response.status_code}")
        if response.status_code != 200:
            raise ProviderRejected("oidc_userinfo_refused", f"the provider's userinfo answered HTTP {response.status_code}")
        try:
            info = UserInfo(response.json())
        except (ValueError, TypeError):
            raise ProviderRejected("oidc_userinfo_refused", "the provider's userinfo is not a JSON object") from None
        if info.get("sub") != subject:  # OIDC Core 5.3.2: a userinfo of someone else is ignored
            raise ProviderRejected("oidc_userinfo_refused", "the userinfo is not about the ID token's subject")
        return info

    async def _validated_claims(
        self, provider: OidcProvider, id_token: str, nonce: str, access_token: str | None
    ) -> tuple[CodeIDToken, str | None]:
        keys = _import_keys(json.loads(provider.jwks))
        refreshed = None
        try:
            try:
                decoded = jwt.decode(id_token, keys, algorithms=provider.signing_algs)
            except InvalidKeyIdError:
                # The provider rotated its keys: fetch them once, then the key must be there.
                refreshed = await self._fetch_jwks(provider)
                decoded = jwt.decode(id_token, _import_keys(json.loads(refreshed)), algorithms=provider.signing_algs)
            claims = CodeIDToken(
                decoded.claims,
                decoded.header,
                options={
                    "iss": {"essential": True, "value": provider.issuer},
                    "aud": {"essential": True, "value": provider.client_id},
                    "sub": {"essential": True},
                    "exp": {"essential": True},
                    "iat": {"essential": True},
                    "nonce": {"essential": True, "value": nonce},
                },
                params={"nonce": nonce, "client_id": provider.client_id, "access_token": access_token},
            )
            claims.validate(now=int(self.ctx.clock.now().timestamp()), leeway=LEEWAY_S)
        except JoseError as exc:
            raise ProviderRejected("oidc_bad_id_token", f"the ID token is not valid: {exc.error}"
                                   f"{f' ({exc.description})' if exc.description else ''}") from None
        if not isinstance(claims.get("sub"), str) or not claims["sub"]:
            raise ProviderRejected("oidc_bad_id_token", "the ID token has no subject")
        return claims, refreshed

    async def _fetch_jwks(self, provider: OidcProvider) -> str:
        try:
            async with httpx2.AsyncClient(timeout=self.timeout_s) as http:
                response = await http.get(provider.jwks_uri)
        except httpx2.TransportError as exc:
            raise ProviderUnreachable(f"cannot reach the provider's key set: {exc or type(exc).__name__}") from None
        if response.status_code != 200:
            raise ProviderRejected("oidc_bad_id_token", f"the provider's key set answered HTTP {response.status_code}")
        try:
            jwks = response.json()
            _import_keys(jwks)
        except (ValueError, RpcFailure):
            raise ProviderRejected("oidc_bad_id_token", "the provider's key set is not valid") from None
        return json.dumps(jwks)


def _import_keys(jwks: Any) -> KeySet:
    """Public keys only: a key set with a symmetric key is refused."""
    try:
        keys = KeySet.import_key_set(jwks)
    except (JoseError, ValueError, TypeError, KeyError):
        raise RpcFailure(ErrorStatus.INVALID_ARGUMENT, "the provider's key set cannot be read") from None
    if any(key.key_type == "oct" for key in keys.keys):
        raise RpcFailure(ErrorStatus.INVALID_ARGUMENT, "the provider's key set holds a symmetric key")
    return keys


class OidcAdmin:
    """`wgmfa admin oidc set|show` (unlink is a user change: core_service.admin)."""

    def __init__(self, ctx: CoreContext, relying_party: RelyingParty) -> None:
        self.ctx = ctx
        self.relying_party = relying_party

    async def set(self, req: OidcProviderSetRequest) -> OidcProviderInfo:
        try:
            secret = self.ctx.vault.open_sealed(req.client_secret_sealed)
        except SealError as exc:
            raise RpcFailure(ErrorStatus.INVALID_ARGUMENT, f"client_secret_sealed: {exc}") from None
        if not secret:
            raise RpcFailure(ErrorStatus.INVALID_ARGUMENT, "the client secret is empty")
        fresh = await self.relying_party.discover(req, secret)  # no transaction held over HTTP
        async with self.ctx.transaction() as session:
            provider = await load_provider(session)
            if provider is None:
                provider = fresh
            else:
                for field in OidcProvider.model_fields:
                    if field != "id":
                        setattr(provider, field, getattr(fresh, field))
            session.add(provider)
            enqueue_event(
                session,
                OidcProviderSet(actor=actor_of(req), issuer=provider.issuer, client_id=provider.client_id,
                                display_name=provider.display_name, scopes=provider.scopes,
                                redirect_uri=provider.redirect_uri),
            )
        log.info("OpenID provider set to %s (client %s)", provider.issuer, provider.client_id)
        return provider_info(provider)

    async def show(self) -> OidcProviderInfo:
        async with self.ctx.db.reader() as session:
            provider = await load_provider(session)
        if provider is None:
            raise RpcFailure(ErrorStatus.NOT_FOUND, NOT_CONFIGURED)
        return provider_info(provider)


def bind_or_match(user: User, identity: Identity, bound_elsewhere: bool) -> str | None:
    """None if `identity` may complete this user's login (binding it on the first
    success); else the reason it may not."""
    if user.oidc_issuer is not None or user.oidc_subject is not None:
        if (user.oidc_issuer, user.oidc_subject) != (identity.issuer, identity.subject):
            return "oidc_identity_mismatch"
        return None
    if bound_elsewhere:
        return "oidc_identity_mismatch"
    if not identity.email_verified or not identity.email:
        return "oidc_email_unverified"
    if identity.email.strip().lower() != user.email.strip().lower():
        return "oidc_identity_mismatch"
    user.oidc_issuer, user.oidc_subject = identity.issuer, identity.subject
    return None

