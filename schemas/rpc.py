"""Request/reply models on wgmfa.rpc.* (proxy and `wgmfa admin` → core).

Secrets never travel in clear, not even on request/reply subjects: a field named
`*_sealed` holds an X25519 sealed box (base64). Requests seal to the core's RPC key
(`CoreHello`); replies seal to the caller's per-process `reply_key`.
"""
from __future__ import annotations

from enum import StrEnum
from typing import Any

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field

from runtime.errors import WgmfaError

from schemas.common import Int32, MfaMode, RevokeReason, SessionState
from schemas.events import MethodName


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ErrorStatus(StrEnum):
    """Outcome classes; the proxy maps each to one HTTP status."""

    INVALID_ARGUMENT = "invalid_argument"  # 400
    UNAUTHENTICATED = "unauthenticated"  # 401
    PERMISSION_DENIED = "permission_denied"  # 403
    NOT_FOUND = "not_found"  # 404
    CONFLICT = "conflict"  # 409
    FAILED_PRECONDITION = "failed_precondition"  # 428
    RATE_LIMITED = "rate_limited"  # 429
    UNAVAILABLE = "unavailable"  # 503
    INTERNAL = "internal"  # 500


class RpcError(_Model):
    status: ErrorStatus
    message: str
    retry_after_s: Int32 | None = None


class RpcFailure(WgmfaError):
    """Raised by a handler to answer with an error; the message is shown to the caller."""

    def __init__(self, status: ErrorStatus, message: str, retry_after_s: int | None = None) -> None:
        super().__init__(message)
        self.error = RpcError(status=status, message=message, retry_after_s=retry_after_s)


class RpcReply(_Model):
    ok: bool
    result: dict[str, Any] | None = None
    error: RpcError | None = None


class ClientInfo(_Model):
    ip: str | None = None
    user_agent: str | None = Field(None, max_length=512)


# --- core -----------------------------------------------------------------------------


class Empty(_Model):
    """A request or reply with no fields."""


class CoreHello(Empty):
    pass


class CoreHelloResult(_Model):
    rpc_public_key: str = Field(description="X25519 public key requests seal their secrets to")
    version: str
    instance_id: str = Field(description="this deployment's id, shown to mobile apps in QR codes")


# --- client MFA -------------------------------------------------------------------------


class MfaStartRequest(_Model):
    location_id: Int32
    pubkey: str = Field(max_length=256)
    method: Int32
    client: ClientInfo = Field(default_factory=ClientInfo)
    reply_key: str


class MfaStartResult(_Model):
    token_sealed: str
    challenge: str | None = None


class MfaFinishRequest(_Model):
    token_sealed: str
    code_sealed: str | None = None
    auth_pub_key: str | None = Field(None, max_length=256)
    client: ClientInfo = Field(default_factory=ClientInfo)
    reply_key: str


class MfaFinishResult(_Model):
    psk_sealed: str
    token_sealed: str | None = None


class MfaFinishRemoteRequest(_Model):
    """The phone approves a desktop's login (method 4) by signing its challenge."""

    token_sealed: str
    code_sealed: str | None = Field(None, description="the Ed25519 signature of the challenge, base64")
    auth_pub_key: str | None = Field(None, max_length=256)
    client: ClientInfo = Field(default_factory=ClientInfo)


class TokenStatusRequest(_Model):
    token_sealed: str


class TokenStatusResult(_Model):
    """What the proxy needs to wait for a mobile approval; no secret."""

    login_id: str
    method: str
    state: str
    expires_at: AwareDatetime


class RegisterMobileRequest(_Model):
    """The phone proves it may register: the enrollment cookie of its owner's session
    (Defguard's apps), or the one-time code `wgmfa admin mobile allow` printed."""

    auth_pub_key: str = Field(max_length=256)
    device_pub_key: str = Field(max_length=256)
    cookie_sealed: str | None = None
    code_sealed: str | None = None
    client: ClientInfo = Field(default_factory=ClientInfo)


# --- OIDC (method 2, the browser flow) -----------------------------------------------


class OidcAuthUrlRequest(_Model):
    """The browser page asks where to send the user (Defguard's auth_info, type mfa)."""

    token_sealed: str = Field(description="the MFA login token the page was opened with")
    client: ClientInfo = Field(default_factory=ClientInfo)
    reply_key: str


class OidcAuthUrlResult(_Model):
    url_sealed: str = Field(description="the provider's authorization URL (it carries the state)")
    button_display_name: str
    cookie_sealed: str = Field(description="the browser-binding cookie's value, opaque to the proxy")
    cookie_max_age_s: int = Field(ge=1, le=86_400)


class OidcCallbackRequest(_Model):
    """What the provider sent the browser back with, and the browser's binding cookie."""

    state_sealed: str
    code_sealed: str | None = None
    iss: str | None = Field(None, max_length=512, description="RFC 9207 issuer response parameter")
    error: str | None = Field(None, max_length=256, description="the provider's error code, if it refused")
    cookie_sealed: str | None = None
    client: ClientInfo = Field(default_factory=ClientInfo)


UNKNOWN_ACTOR = "unknown"


class _AdminChange(_Model):
    """A request that changes something: the acting admin goes into its `admin.*` event.
    `wgmfa admin` fills it with the operating-system user or `--actor`."""

    actor: str | None = Field(None, max_length=128)


def actor_of(request: object) -> str:
    """The acting admin a request names (`wgmfa admin` always fills it in)."""
    return getattr(request, "actor", None) or UNKNOWN_ACTOR


class OidcProviderSetRequest(_AdminChange):
    issuer: str = Field(min_length=1, max_length=512)
    client_id: str = Field(min_length=1, max_length=255)
    client_secret_sealed: str
    display_name: str = Field("OpenID", min_length=1, max_length=64)
    scopes: str = Field("openid email profile", min_length=6, max_length=255)
    redirect_uri: str = Field(min_length=1, max_length=512, description="<proxy public URL>/openid/mfa/callback")


class OidcProviderInfo(_Model):
    """The configured provider; never its secret."""

    issuer: str
    client_id: str
    display_name: str
    scopes: str
    redirect_uri: str
    authorization_endpoint: str
    token_endpoint: str
    userinfo_endpoint: str | None = None
    jwks_uri: str
    signing_algs: list[str]
    iss_parameter_supported: bool
    updated_at: AwareDatetime


# --- admin ------------------------------------------------------------------------------

MAX_SECONDS = 10 * 365 * 86400  # bounds every duration an admin may set


class LocationAddRequest(_AdminChange):
    name: str = Field(min_length=1, max_length=64)
    endpoint: str = Field(description="HOST:PORT clients connect to")
    network: str = Field(description="the VPN network, e.g. 10.10.0.0/24")
    mfa_mode: MfaMode = MfaMode.INTERNAL
    threshold_s: int | None = Field(None, ge=0, le=MAX_SECONDS)
    lifetime_s: int | None = Field(None, ge=0, le=MAX_SECONDS)
    keepalive_s: int | None = Field(None, ge=0, le=MAX_SECONDS)
    allowed_ips: list[str] = Field(default_factory=list, max_length=256, description="routed networks, CIDR")
    dns: list[str] = Field(default_factory=list, max_length=16, description="DNS server addresses")
    reply_key: str


class LocationInfo(_Model):
    id: Int32
    name: str
    endpoint: str
    listen_port: Int32
    network: str
    gateway_address: str = Field(description="the gateway's interface address, CIDR")
    server_pubkey: str
    sealing_pubkey: str
    mfa_mode: MfaMode
    threshold_s: Int32
    lifetime_s: Int32
    keepalive_s: Int32
    allowed_ips: list[str] = Field(default_factory=list, description="routed networks besides `network`")
    dns: list[str] = Field(default_factory=list)


class LocationSetRequest(_AdminChange):
    """Change a location; fields left None stay as they are."""

    location: str = Field(description="location name or id")
    mfa_mode: MfaMode | None = None
    threshold_s: int | None = Field(None, ge=0, le=MAX_SECONDS)
    lifetime_s: int | None = Field(None, ge=0, le=MAX_SECONDS)
    keepalive_s: int | None = Field(None, ge=0, le=MAX_SECONDS)
    endpoint: str | None = Field(None, max_length=255)
    network: str | None = Field(None, max_length=64, description="a new VPN network: every device is renumbered")
    allowed_ips: list[str] | None = Field(None, max_length=256)
    dns: list[str] | None = Field(None, max_length=16)


class LocationRemoveRequest(_AdminChange):
    location: str = Field(description="location name or id")


class LocationChangeResult(_Model):
    location: LocationInfo
    changes: dict[str, list[Any]] = Field(description="field -> [old, new]")
    peers_reissued: int = Field(0, ge=0, le=1_000_000_000)
    peers_removed: int = Field(0, ge=0, le=1_000_000_000)
    sessions_revoked: int = Field(0, ge=0, le=1_000_000_000)


class GatewayCredentials(_Model):
    """What a gateway of the location needs; shown once by `location add`."""

    location_id: Int32
    location_name: str
    private_key: str = Field(description="the location's WireGuard private key")
    sealing_private_key: str = Field(description="opens the PSKs sealed in peer.authorized")
    listen_port: Int32
    address: str
    network: str = Field(description="the location's VPN network: every allowed IP must lie in it")
    mfa_required: bool = Field(description="an MFA location: a peer needs a PSK and a threshold")
    core_signing_key: str = Field(description="the core's Ed25519 public key (base64) peer authorizations are signed with")


class LocationAddResult(_Model):
    location: LocationInfo
    credentials_sealed: str = Field(description="GatewayCredentials JSON, sealed to reply_key")


class LocationRef(_Model):
    location: str = Field(description="location name or id")


class GatewayCredentialsRequest(LocationRef):
    reply_key: str


class GatewayCredentialsResult(_Model):
    credentials_sealed: str


class LocationListResult(_Model):
    locations: list[LocationInfo]


class UserAddRequest(_AdminChange):
    username: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.@-]+$")
    email: str = Field(min_length=3, max_length=254, pattern=r"^[^@\s]+@[^@\s]+$")


class UserRef(_Model):
    username: str


class UserChangeRequest(UserRef, _AdminChange):
    """user disable, enable, delete, unlock."""


class UserSetRequest(UserRef, _AdminChange):
    email: str | None = Field(None, min_length=3, max_length=254, pattern=r"^[^@\s]+@[^@\s]+$")


class FactorRemoveRequest(UserRef, _AdminChange):
    force: bool = Field(False, description="also when it is the user's last factor at an MFA location")


class EmailMfaRequest(UserRef, _AdminChange):
    enabled: bool
    force: bool = False


class UserInfo(_Model):
    id: Int32
    username: str
    email: str
    is_active: bool
    totp_enabled: bool
    email_mfa_enabled: bool
    oidc_issuer: str | None = Field(None, description="the bound OpenID identity's issuer, after the first OIDC login")
    oidc_subject: str | None = Field(None, description="the bound OpenID identity's subject")


class UserListResult(_Model):
    users: list[UserInfo]


class UserChangeResult(_Model):
    user: UserInfo
    sessions_revoked: int = Field(0, ge=0, le=1_000_000_000)
    peers_removed: int = Field(0, ge=0, le=1_000_000_000)
    peers_added: int = Field(0, ge=0, le=1_000_000_000)


class TotpEnrollRequest(UserRef, _AdminChange):
    reply_key: str


class TotpEnrollResult(_Model):
    otpauth_uri_sealed: str


class TotpConfirmRequest(UserRef, _AdminChange):
    code_sealed: str


class DeviceAddRequest(_AdminChange):
    username: str
    name: str = Field(min_length=1, max_length=64)
    location: str = Field(description="location name or id")
    pubkey: str


class DeviceConfig(_Model):
    """Everything a client needs for one location, except its private key."""

    device_id: Int32
    device_name: str
    username: str
    pubkey: str
    location_id: Int32
    location_name: str
    endpoint: str
    server_pubkey: str
    address: str = Field(description="the device's VPN address, CIDR")
    allowed_ips: list[str]
    keepalive_s: Int32
    mfa_mode: MfaMode
    instance_id: str


class DeviceListRequest(_Model):
    username: str | None = None


class DeviceListResult(_Model):
    devices: list[DeviceConfig]


class DeviceRef(_AdminChange):
    username: str
    device_name: str


class DeviceRenameRequest(DeviceRef):
    new_name: str = Field(min_length=1, max_length=64)


class MobileRemoveRequest(DeviceRef):
    force: bool = False


class DeviceChangeResult(_Model):
    username: str
    device_id: Int32
    device_name: str
    sessions_revoked: int = Field(0, ge=0, le=1_000_000_000)
    peers_removed: int = Field(0, ge=0, le=1_000_000_000)


class MobileAllowRequest(_AdminChange):
    username: str
    device_name: str
    valid_s: Int32 = Field(3600, ge=60, le=7 * 86400)
    reply_key: str


class MobileAllowResult(_Model):
    username: str
    device_name: str
    device_pubkey: str
    until: AwareDatetime
    code_sealed: str = Field(description="the one-time registration code, sealed to reply_key")


class SessionsRequest(_Model):
    location: str | None = None
    include_revoked: bool = True
    username: str | None = None
    limit: Int32 = Field(100, ge=1, le=10_000)


class SessionInfo(_Model):
    id: Int32
    generation: Int32
    location_id: Int32
    location_name: str
    device_id: Int32
    device_name: str
    username: str
    method: MethodName
    state: SessionState
    authorized_at: AwareDatetime
    connected_at: AwareDatetime | None = None
    expires_at: AwareDatetime
    revoked_at: AwareDatetime | None = None
    revoke_reason: RevokeReason | None = None
    # What the gateways saw last (live sessions only), from the freshest gateway's sample.
    gateway_id: str | None = None
    endpoint: str | None = Field(None, description="the client's address as the gateway sees it")
    handshake_age_s: int | None = Field(None, ge=0, le=MAX_SECONDS, description="seconds since the latest handshake")
    rx_bytes: int | None = Field(None, ge=0, le=2**63 - 1)
    tx_bytes: int | None = Field(None, ge=0, le=2**63 - 1)
    sampled_age_s: int | None = Field(None, ge=0, le=MAX_SECONDS, description="seconds since that sample arrived")
    idle_deadline: AwareDatetime | None = Field(None, description="when the reaper revokes it if no handshake comes")
    expires_in_s: int | None = Field(None, ge=0, le=MAX_SECONDS, description="seconds to the lifetime's end")


class SessionsResult(_Model):
    sessions: list[SessionInfo]


class RevokeRequest(_AdminChange):
    session_id: Int32


class UserFactors(_Model):
    totp: bool
    totp_pending: bool = Field(description="a new secret enrolled, waiting for `totp confirm`")
    email: bool
    mobile_keys: list[str] = Field(description="devices whose phone app registered a signing key")


class UserDetail(_Model):
    """`user show`: everything about one user, no secret."""

    user: UserInfo
    factors: UserFactors
    devices: list[DeviceConfig]
    sessions: list[SessionInfo] = Field(description="live sessions, with the gateways' view")
    failed_attempts: int = Field(ge=0, le=1_000_000_000, description="failed factors in a row")
    hard_locked: bool = Field(False, description="locked until an administrator unlocks the user")
    locked_until: AwareDatetime | None = Field(None, description="the latest lockout of one of the user's client addresses")
    oidc_issuer: str | None = None
    oidc_subject: str | None = None


# --- enrollment (Defguard's apps enroll themselves) -------------------------------------------

MAX_TTL_S = 30 * 86400


class EnrollCreateRequest(_AdminChange):
    """`wgmfa admin enroll USERNAME`: a single-use token the user's app starts with."""

    username: str = Field(max_length=64)
    ttl_s: int = Field(86400, ge=60, le=MAX_TTL_S)
    device_name: str | None = Field(None, min_length=1, max_length=64)
    reply_key: str


class EnrollmentInfo(_Model):
    id: str
    username: str
    device_name: str | None = None
    created_at: AwareDatetime
    expires_at: AwareDatetime
    started_at: AwareDatetime | None = None
    session_deadline: AwareDatetime | None = None
    state: str = Field(description="open, started, expired or revoked")


class EnrollCreateResult(_Model):
    enrollment: EnrollmentInfo
    token_sealed: str = Field(description="the enrollment token, sealed to reply_key; shown once")


class EnrollListRequest(_Model):
    include_closed: bool = False


class EnrollListResult(_Model):
    enrollments: list[EnrollmentInfo]


class EnrollRevokeRequest(_AdminChange):
    enrollment: str = Field(max_length=64, description="an enrollment id, or a username: all of its open ones")


class EnrollRevokeResult(_Model):
    revoked: list[EnrollmentInfo]


class EnrollStartRequest(_Model):
    token_sealed: str
    client: ClientInfo = Field(default_factory=ClientInfo)
    reply_key: str


class EnrollUser(_Model):
    username: str
    email: str
    is_active: bool
    enrolled: bool = Field(description="the user has a second factor already: the app skips setting one up")
    device_names: list[str]


class EnrollStartResult(_Model):
    cookie_sealed: str = Field(description="the session cookie's value, sealed to reply_key")
    deadline: AwareDatetime
    user: EnrollUser
    instance_id: str
    instance_name: str
    smtp_configured: bool


class EnrollSession(_Model):
    """A request inside an enrollment session: the app's cookie, sealed to the core."""

    cookie_sealed: str | None = Field(None, description="None: the app sent no cookie")
    client: ClientInfo = Field(default_factory=ClientInfo)


class EnrollFactorStartRequest(EnrollSession):
    method: int = Field(ge=0, le=4)
    reply_key: str


class EnrollFactorStartResult(_Model):
    totp_secret_sealed: str | None = Field(None, description="base32 TOTP secret sealed to reply_key; None for email")


class EnrollFactorFinishRequest(EnrollSession):
    code_sealed: str


class EnrollCreateDeviceRequest(EnrollSession):
    name: str = Field(max_length=256)
    pubkey: str = Field(max_length=256)
    reply_key: str


class EnrollNetworkInfoRequest(EnrollSession):
    pubkey: str = Field(max_length=256)
    reply_key: str


class PollRequest(_Model):
    token_sealed: str
    client: ClientInfo = Field(default_factory=ClientInfo)
    reply_key: str


class AppDevice(_Model):
    id: int = Field(ge=1, le=2**63 - 1)
    name: str
    pubkey: str
    user_id: int = Field(ge=1, le=2**63 - 1)
    created_at: int = Field(ge=0, le=2**63 - 1, description="Unix seconds")


class AppLocationConfig(_Model):
    """One location as Defguard's apps read it (proto `DeviceConfig`)."""

    network_id: int = Field(ge=1, le=2**63 - 1)
    network_name: str
    config: str = Field(description="a wg-quick configuration without the private key")
    endpoint: str
    assigned_ip: str
    pubkey: str = Field(description="the location's WireGuard public key")
    allowed_ips: str = Field(description="comma-separated networks routed through the tunnel")
    dns: str | None = None
    mfa_enabled: bool = Field(description="deprecated by Defguard: true only for internal MFA")
    keepalive_interval: int = Field(ge=0, le=65535)
    location_mfa_mode: int = Field(ge=1, le=3, description="1 disabled, 2 internal, 3 external")
    service_location_mode: int = Field(1, ge=0, le=3, description="1: not a service location")


class AppDeviceConfigResult(_Model):
    device: AppDevice
    configs: list[AppLocationConfig]
    username: str
    instance_id: str
    instance_name: str
    token_sealed: str = Field(description="the device's polling token, sealed to reply_key")
