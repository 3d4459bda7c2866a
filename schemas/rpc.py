"""Request/reply models on wgmfa.rpc.* (proxy and `wgmfa admin` → core).

Secrets never travel in clear, not even on request/reply subjects: a field named
`*_sealed` holds an X25519 sealed box (base64). Requests seal to the core's RPC key
(`CoreHello`); replies seal to the caller's per-process `reply_key`.
"""
from __future__ import annotations

from enum import StrEnum
from typing import Any

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field

from schemas.common import MfaMode, RevokeReason, SessionState
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
    retry_after_s: int | None = None


class RpcFailure(Exception):
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
    location_id: int
    pubkey: str = Field(max_length=256)
    method: int
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
    auth_pub_key: str = Field(max_length=256)
    device_pub_key: str = Field(max_length=256)
    client: ClientInfo = Field(default_factory=ClientInfo)


# --- admin ------------------------------------------------------------------------------


class LocationAddRequest(_Model):
    name: str = Field(min_length=1, max_length=64)
    endpoint: str = Field(description="HOST:PORT clients connect to")
    network: str = Field(description="the VPN network, e.g. 10.10.0.0/24")
    mfa_mode: MfaMode = MfaMode.INTERNAL
    threshold_s: int | None = None
    lifetime_s: int | None = None
    keepalive_s: int | None = None
    reply_key: str


class LocationInfo(_Model):
    id: int
    name: str
    endpoint: str
    listen_port: int
    network: str
    gateway_address: str = Field(description="the gateway's interface address, CIDR")
    server_pubkey: str
    sealing_pubkey: str
    mfa_mode: MfaMode
    threshold_s: int
    lifetime_s: int
    keepalive_s: int


class GatewayCredentials(_Model):
    """What a gateway of the location needs; shown once by `location add`."""

    location_id: int
    location_name: str
    private_key: str = Field(description="the location's WireGuard private key")
    sealing_private_key: str = Field(description="opens the PSKs sealed in peer.authorized")
    listen_port: int
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


class UserAddRequest(_Model):
    username: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.@-]+$")
    email: str = Field(min_length=3, max_length=254, pattern=r"^[^@\s]+@[^@\s]+$")


class UserRef(_Model):
    username: str


class EmailMfaRequest(UserRef):
    enabled: bool


class UserInfo(_Model):
    id: int
    username: str
    email: str
    is_active: bool
    totp_enabled: bool
    email_mfa_enabled: bool


class UserListResult(_Model):
    users: list[UserInfo]


class TotpEnrollRequest(UserRef):
    reply_key: str


class TotpEnrollResult(_Model):
    otpauth_uri_sealed: str


class TotpConfirmRequest(UserRef):
    code_sealed: str


class DeviceAddRequest(_Model):
    username: str
    name: str = Field(min_length=1, max_length=64)
    location: str = Field(description="location name or id")
    pubkey: str


class DeviceConfig(_Model):
    """Everything a client needs for one location, except its private key."""

    device_id: int
    device_name: str
    username: str
    pubkey: str
    location_id: int
    location_name: str
    endpoint: str
    server_pubkey: str
    address: str = Field(description="the device's VPN address, CIDR")
    allowed_ips: list[str]
    keepalive_s: int
    mfa_mode: MfaMode
    instance_id: str


class DeviceListRequest(_Model):
    username: str | None = None


class DeviceListResult(_Model):
    devices: list[DeviceConfig]


class MobileAllowRequest(_Model):
    username: str
    device_name: str
    valid_s: int = Field(3600, ge=60, le=7 * 86400)


class MobileAllowResult(_Model):
    username: str
    device_name: str
    device_pubkey: str
    until: AwareDatetime


class SessionsRequest(_Model):
    location: str | None = None
    include_revoked: bool = True
    limit: int = Field(100, ge=1, le=10_000)


class SessionInfo(_Model):
    id: int
    generation: int
    location_id: int
    location_name: str
    device_id: int
    device_name: str
    username: str
    method: MethodName
    state: SessionState
    authorized_at: AwareDatetime
    connected_at: AwareDatetime | None = None
    expires_at: AwareDatetime
    revoked_at: AwareDatetime | None = None
    revoke_reason: RevokeReason | None = None


class SessionsResult(_Model):
    sessions: list[SessionInfo]


class RevokeRequest(_Model):
    session_id: int
