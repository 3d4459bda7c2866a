"""Events: every message published on a stream carries the envelope, then its body.

Envelope: `event_id` (UUIDv7, also sent as the `Nats-Msg-Id` header), `type`, `version`,
`occurred_at`. Bodies are flat next to the envelope, so `nats sub` shows plain JSON.
"""
from __future__ import annotations

from typing import Annotated, Any, Literal, Union
from uuid import UUID

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, TypeAdapter

from schemas.common import Int32, Int64, RevokeReason, SessionState, utcnow, uuid7

MethodName = Literal["totp", "email", "oidc", "biometric", "mobile_approve"]


class Event(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    event_id: UUID = Field(default_factory=uuid7)
    type: str
    version: Literal[1] = 1
    occurred_at: AwareDatetime = Field(default_factory=utcnow)


# --- peer state: stream WGMFA_PEERS, subject wgmfa.peer.<location_id>.<device_id> -----------


class PeerAuthorized(Event):
    """The desired state of one device at one location: present on every gateway."""

    type: Literal["peer.authorized"] = "peer.authorized"
    location_id: Int32
    device_id: Int32
    generation: Int32 = Field(ge=1)
    session_id: Int32 | None = Field(None, description="None for a location without MFA")
    pubkey: str
    allowed_ips: list[str]
    keepalive_s: Int32
    psk_sealed: str | None = Field(
        None, description="the PSK sealed (X25519 sealed box) to the location's sealing key"
    )
    authorized_at: AwareDatetime
    expires_at: AwareDatetime | None = None
    threshold_s: Int32 | None = Field(None, description="peer disconnect threshold; None: never reaped")
    signature: str | None = Field(
        None,
        description="the core's Ed25519 signature (base64) over every field above but the envelope; "
        "gateways apply nothing else",
    )


class PeerRevoked(Event):
    """The device must be absent from every gateway of the location."""

    type: Literal["peer.revoked"] = "peer.revoked"
    location_id: Int32
    device_id: Int32
    generation: Int32 = Field(ge=1)
    session_id: Int32 | None = None
    pubkey: str
    reason: RevokeReason


PeerState = Annotated[Union[PeerAuthorized, PeerRevoked], Field(discriminator="type")]


def peer_state_order(event: PeerAuthorized | PeerRevoked) -> tuple[int, int]:
    """Generations order everything: a higher generation wins, and within one generation
    the revoke comes after the authorize. A state applies only over a lower order."""
    return (event.generation, 1 if isinstance(event, PeerRevoked) else 0)


# --- handshake statistics: stream WGMFA_STATS, subject wgmfa.stats.<location_id>.<gateway_id> --


class PeerSample(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    pubkey: str
    latest_handshake: AwareDatetime | None = Field(description="on the gateway's clock; None: never")
    rx_bytes: Int64 = Field(ge=0)
    tx_bytes: Int64 = Field(ge=0)
    endpoint: str | None = None


class StatsSample(Event):
    """One read of a gateway's interface. Large interfaces are sent in several parts that
    share `sample_id` and `sampled_at`."""

    type: Literal["stats.sample"] = "stats.sample"
    location_id: Int32
    gateway_id: str
    sample_id: UUID
    sampled_at: AwareDatetime = Field(description="the gateway's clock when it read the interface")
    part: Int32 = Field(1, ge=1)
    parts: Int32 = Field(1, ge=1)
    peers: list[PeerSample]
    stats_interval_s: float | None = Field(None, description="the gateway's WGMFA_STATS_INTERVAL")


# --- audit trail: stream WGMFA_EVENTS, subject wgmfa.events.<type> --------------------------


class _DeviceAtLocation(Event):
    location_id: Int32
    location_name: str | None = None
    device_id: Int32
    device_name: str | None = None
    user_id: Int32
    username: str | None = None


class MfaStarted(_DeviceAtLocation):
    type: Literal["mfa.started"] = "mfa.started"
    login_id: UUID
    method: MethodName
    client_ip: str | None = None
    expires_at: AwareDatetime


class MfaSucceeded(_DeviceAtLocation):
    type: Literal["mfa.succeeded"] = "mfa.succeeded"
    login_id: UUID
    method: MethodName
    session_id: Int32
    generation: Int32
    client_ip: str | None = None


class MfaFailed(_DeviceAtLocation):
    type: Literal["mfa.failed"] = "mfa.failed"
    login_id: UUID
    method: MethodName
    reason: str = Field(description="wrong_code, replayed_code, missing_code, …")
    failed_attempts: Int32
    client_ip: str | None = None


class MfaLocked(_DeviceAtLocation):
    """A login died after too many failed factors, and/or its user is locked out from
    `client_ip` for a while (`user_locked_until`), or everywhere until an administrator
    unlocks them (`hard_locked`)."""

    type: Literal["mfa.locked"] = "mfa.locked"
    login_id: UUID
    method: MethodName
    failed_attempts: Int32
    login_dead: bool
    user_locked_until: AwareDatetime | None = None
    hard_locked: bool = False
    client_ip: str | None = None


class SessionAuthorized(_DeviceAtLocation):
    type: Literal["session.authorized"] = "session.authorized"
    session_id: Int32
    generation: Int32
    method: MethodName
    expires_at: AwareDatetime


class SessionConnected(_DeviceAtLocation):
    type: Literal["session.connected"] = "session.connected"
    session_id: Int32
    generation: Int32
    connected_at: AwareDatetime
    gateway_id: str


class SessionRevoked(_DeviceAtLocation):
    type: Literal["session.revoked"] = "session.revoked"
    session_id: Int32
    generation: Int32
    reason: RevokeReason
    previous_state: SessionState


class LocationCreated(Event):
    type: Literal["admin.location_created"] = "admin.location_created"
    actor: str | None = Field(None, description="the acting admin")
    location_id: Int32
    location_name: str
    mfa_mode: str
    network: str
    threshold_s: Int32
    lifetime_s: Int32


class UserCreated(Event):
    type: Literal["admin.user_created"] = "admin.user_created"
    actor: str | None = Field(None, description="the acting admin")
    user_id: Int32
    username: str


class DeviceAdded(_DeviceAtLocation):
    type: Literal["admin.device_added"] = "admin.device_added"
    actor: str | None = Field(None, description="the acting admin")
    address: str


class TotpEnrolled(Event):
    type: Literal["admin.totp_enrolled"] = "admin.totp_enrolled"
    actor: str | None = Field(None, description="the acting admin")
    user_id: Int32
    username: str
    confirmed: bool


class GatewaySynced(Event):
    """A gateway made its interface match the peer stream (at start, or after losing it)."""

    type: Literal["gateway.synced"] = "gateway.synced"
    location_id: Int32
    gateway_id: str
    interface: str
    peers: Int32
    added: Int32
    removed: Int32
    updated: Int32
    unchanged: Int32
    duration_ms: float


class GatewayApplyFailed(Event):
    """A gateway could not apply a peer state; it retries until it can."""

    type: Literal["gateway.apply_failed"] = "gateway.apply_failed"
    location_id: Int32
    gateway_id: str
    device_id: Int32 | None = None
    generation: Int32 | None = None
    action: Literal["authorize", "revoke", "sync"]
    reason: str
    attempt: Int32


class ReaperStarted(Event):
    """A reaper (re)started and rebuilt its state from the streams."""

    type: Literal["reaper.started"] = "reaper.started"
    reaper_id: str
    watching: Int32 = Field(description="MFA authorizations found on the peer stream")
    replayed: Int32 = Field(description="peer and stats messages read back")


class StatsIntervalMismatch(Event):
    """A gateway samples at another interval than the reaper assumes: its peers' ages are
    judged against the wrong threshold floor (too rare a gateway gets healthy peers
    revoked). Reported once per gateway and reaper start."""

    type: Literal["reaper.stats_interval_mismatch"] = "reaper.stats_interval_mismatch"
    reaper_id: str
    location_id: Int32
    gateway_id: str
    gateway_interval_s: float
    reaper_interval_s: float


class LoginApproved(Event):
    """A phone approved a waiting login (method 4): wakes the proxy holding the desktop's
    socket, on the core-NATS subject wgmfa.notify.login.<login_id>. Carries no secret."""

    type: Literal["login.approved"] = "login.approved"
    login_id: UUID


class MfaEmailSent(_DeviceAtLocation):
    type: Literal["mfa.email_sent"] = "mfa.email_sent"
    login_id: UUID
    to: str = Field(description="the address, partly masked")
    expires_at: AwareDatetime


class MobileKeyRegistered(Event):
    type: Literal["admin.mobile_key_registered"] = "admin.mobile_key_registered"
    user_id: Int32
    username: str
    device_id: Int32
    device_name: str
    client_ip: str | None = None


_Id = Annotated[int, Field(ge=1, le=2**63 - 1)]


class EnrollmentIssued(Event):
    """An admin issued an enrollment token (the token itself is never in an event)."""

    type: Literal["enrollment.issued"] = "enrollment.issued"
    actor: str | None = Field(None, description="the acting admin")
    enrollment_id: UUID
    user_id: _Id
    username: str
    expires_at: AwareDatetime


class EnrollmentStarted(Event):
    type: Literal["enrollment.started"] = "enrollment.started"
    enrollment_id: UUID
    user_id: _Id
    username: str
    session_deadline: AwareDatetime
    client_ip: str | None = None


class EnrollmentDeviceCreated(Event):
    type: Literal["enrollment.device_created"] = "enrollment.device_created"
    enrollment_id: UUID
    user_id: _Id
    username: str
    device_id: _Id
    device_name: str
    locations: list[_Id] = Field(description="ids of the locations the device was placed at")
    client_ip: str | None = None


class EnrollmentFailed(Event):
    """A refused enrollment step: bad, expired, reused or revoked token, a forged or stale
    cookie, a wrong setup code. Ids are those known at the point of failure."""

    type: Literal["enrollment.failed"] = "enrollment.failed"
    step: str = Field(description="start, factor_start, factor_finish, create_device, network_info, register_mobile")
    reason: str
    enrollment_id: UUID | None = None
    user_id: _Id | None = None
    username: str | None = None
    client_ip: str | None = None


class EnrollmentRevoked(Event):
    type: Literal["enrollment.revoked"] = "enrollment.revoked"
    actor: str | None = Field(None, description="the acting admin")
    enrollment_id: UUID
    user_id: _Id
    username: str


# --- admin changes (the acting admin in `actor`; never a secret) ----------------------------


class FieldChange(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    old: Any = None
    new: Any = None


class _AdminChange(Event):
    actor: str = Field(description="the acting admin: the operating-system user or `--actor`")
    changes: dict[str, FieldChange] = Field(default_factory=dict, description="what changed, old and new")
    sessions_revoked: Int32 = Field(0, ge=0, le=1_000_000_000)


class UserChanged(_AdminChange):
    type: Literal[
        "admin.user_disabled", "admin.user_enabled", "admin.user_deleted", "admin.user_unlocked", "admin.user_updated",
        "admin.oidc_unlinked",
    ]
    user_id: Int32
    username: str


class FactorChanged(_AdminChange):
    """A second factor of a user was reset, switched, allowed or removed."""

    type: Literal["admin.totp_reset", "admin.email_mfa_changed", "admin.mobile_allowed", "admin.mobile_key_removed"]
    user_id: Int32
    username: str
    device_id: Int32 | None = None
    device_name: str | None = None


class DeviceChanged(_AdminChange):
    type: Literal["admin.device_removed", "admin.device_renamed", "admin.session_revoked"]
    user_id: Int32
    username: str
    device_id: Int32
    device_name: str
    session_id: Int32 | None = None


class OidcProviderSet(_AdminChange):
    """An admin set the company's OpenID provider (never its secret)."""

    type: Literal["admin.oidc_provider_set"] = "admin.oidc_provider_set"
    issuer: str
    client_id: str
    display_name: str
    scopes: str
    redirect_uri: str


class LocationChanged(_AdminChange):
    type: Literal["admin.location_changed", "admin.location_removed"]
    location_id: Int32
    location_name: str
    peers_reissued: Int32 = Field(0, ge=0, le=1_000_000_000, description="devices whose peer state was issued anew")
    peers_removed: Int32 = Field(0, ge=0, le=1_000_000_000)


class DeadLetter(Event):
    """A message a consumer could not decode or process; published on wgmfa.dlq.<subject>."""

    type: Literal["dlq.message"] = "dlq.message"
    original_subject: str
    service: str
    reason: str
    headers: dict[str, str] = Field(default_factory=dict)
    payload: str = Field(description="the original payload, secret-looking fields redacted")
    payload_encoding: Literal["utf-8", "base64"] = "utf-8"


AuditEvent = Annotated[
    Union[
        MfaStarted,
        MfaSucceeded,
        MfaFailed,
        MfaLocked,
        SessionAuthorized,
        SessionConnected,
        SessionRevoked,
        LocationCreated,
        UserCreated,
        DeviceAdded,
        TotpEnrolled,
        GatewaySynced,
        GatewayApplyFailed,
        ReaperStarted,
        StatsIntervalMismatch,
        MfaEmailSent,
        MobileKeyRegistered,
        EnrollmentIssued,
        EnrollmentStarted,
        EnrollmentDeviceCreated,
        EnrollmentFailed,
        EnrollmentRevoked,
        UserChanged,
        FactorChanged,
        DeviceChanged,
        LocationChanged,
        OidcProviderSet,
    ],
    Field(discriminator="type"),
]

AnyEvent = Annotated[
    Union[
        PeerAuthorized,
        PeerRevoked,
        MfaStarted,
        MfaSucceeded,
        MfaFailed,
        MfaLocked,
        SessionAuthorized,
        SessionConnected,
        SessionRevoked,
        LocationCreated,
        UserCreated,
        DeviceAdded,
        TotpEnrolled,
        GatewaySynced,
        GatewayApplyFailed,
        ReaperStarted,
        StatsIntervalMismatch,
        MfaEmailSent,
        MobileKeyRegistered,
        EnrollmentIssued,
        EnrollmentStarted,
        EnrollmentDeviceCreated,
        EnrollmentFailed,
        EnrollmentRevoked,
        UserChanged,
        FactorChanged,
        DeviceChanged,
        LocationChanged,
        OidcProviderSet,
        LoginApproved,
        StatsSample,
        DeadLetter,
    ],
    Field(discriminator="type"),
]

STATS_ADAPTER: TypeAdapter[StatsSample] = TypeAdapter(StatsSample)
PEER_STATE_ADAPTER: TypeAdapter[PeerAuthorized | PeerRevoked] = TypeAdapter(PeerState)
ANY_EVENT_ADAPTER: TypeAdapter[Event] = TypeAdapter(AnyEvent)
