"""Events: every message published on a stream carries the envelope, then its body.

Envelope: `event_id` (UUIDv7, also sent as the `Nats-Msg-Id` header), `type`, `version`,
`occurred_at`. Bodies are flat next to the envelope, so `nats sub` shows plain JSON.
"""
from __future__ import annotations

from typing import Annotated, Literal, Union
from uuid import UUID

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, TypeAdapter

from schemas.common import RevokeReason, SessionState, utcnow, uuid7

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
    location_id: int
    device_id: int
    generation: int = Field(ge=1)
    session_id: int | None = Field(None, description="None for a location without MFA")
    pubkey: str
    allowed_ips: list[str]
    keepalive_s: int
    psk_sealed: str | None = Field(
        None, description="the PSK sealed (X25519 sealed box) to the location's sealing key"
    )
    authorized_at: AwareDatetime
    expires_at: AwareDatetime | None = None
    threshold_s: int | None = Field(None, description="peer disconnect threshold; None: never reaped")
    signature: str | None = Field(
        None,
        description="the core's Ed25519 signature (base64) over every field above but the envelope; "
        "gateways apply nothing else",
    )


class PeerRevoked(Event):
    """The device must be absent from every gateway of the location."""

    type: Literal["peer.revoked"] = "peer.revoked"
    location_id: int
    device_id: int
    generation: int = Field(ge=1)
    session_id: int | None = None
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
    rx_bytes: int = Field(ge=0)
    tx_bytes: int = Field(ge=0)
    endpoint: str | None = None


class StatsSample(Event):
    """One read of a gateway's interface. Large interfaces are sent in several parts that
    share `sample_id` and `sampled_at`."""

    type: Literal["stats.sample"] = "stats.sample"
    location_id: int
    gateway_id: str
    sample_id: UUID
    sampled_at: AwareDatetime = Field(description="the gateway's clock when it read the interface")
    part: int = Field(1, ge=1)
    parts: int = Field(1, ge=1)
    peers: list[PeerSample]


# --- audit trail: stream WGMFA_EVENTS, subject wgmfa.events.<type> --------------------------


class _DeviceAtLocation(Event):
    location_id: int
    location_name: str | None = None
    device_id: int
    device_name: str | None = None
    user_id: int
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
    session_id: int
    generation: int
    client_ip: str | None = None


class MfaFailed(_DeviceAtLocation):
    type: Literal["mfa.failed"] = "mfa.failed"
    login_id: UUID
    method: MethodName
    reason: str = Field(description="wrong_code, replayed_code, missing_code, …")
    failed_attempts: int
    client_ip: str | None = None


class MfaLocked(_DeviceAtLocation):
    """A login died after too many failed factors, and/or its user is locked out for a while."""

    type: Literal["mfa.locked"] = "mfa.locked"
    login_id: UUID
    method: MethodName
    failed_attempts: int
    login_dead: bool
    user_locked_until: AwareDatetime | None = None
    client_ip: str | None = None


class SessionAuthorized(_DeviceAtLocation):
    type: Literal["session.authorized"] = "session.authorized"
    session_id: int
    generation: int
    method: MethodName
    expires_at: AwareDatetime


class SessionConnected(_DeviceAtLocation):
    type: Literal["session.connected"] = "session.connected"
    session_id: int
    generation: int
    connected_at: AwareDatetime
    gateway_id: str


class SessionRevoked(_DeviceAtLocation):
    type: Literal["session.revoked"] = "session.revoked"
    session_id: int
    generation: int
    reason: RevokeReason
    previous_state: SessionState


class LocationCreated(Event):
    type: Literal["admin.location_created"] = "admin.location_created"
    location_id: int
    location_name: str
    mfa_mode: str
    network: str
    threshold_s: int
    lifetime_s: int


class UserCreated(Event):
    type: Literal["admin.user_created"] = "admin.user_created"
    user_id: int
    username: str


class DeviceAdded(_DeviceAtLocation):
    type: Literal["admin.device_added"] = "admin.device_added"
    address: str


class TotpEnrolled(Event):
    type: Literal["admin.totp_enrolled"] = "admin.totp_enrolled"
    user_id: int
    username: str
    confirmed: bool


class GatewaySynced(Event):
    """A gateway made its interface match the peer stream (at start, or after losing it)."""

    type: Literal["gateway.synced"] = "gateway.synced"
    location_id: int
    gateway_id: str
    interface: str
    peers: int
    added: int
    removed: int
    updated: int
    unchanged: int
    duration_ms: float


class GatewayApplyFailed(Event):
    """A gateway could not apply a peer state; it retries until it can."""

    type: Literal["gateway.apply_failed"] = "gateway.apply_failed"
    location_id: int
    gateway_id: str
    device_id: int | None = None
    generation: int | None = None
    action: Literal["authorize", "revoke", "sync"]
    reason: str
    attempt: int


class ReaperStarted(Event):
    """A reaper (re)started and rebuilt its state from the streams."""

    type: Literal["reaper.started"] = "reaper.started"
    reaper_id: str
    watching: int = Field(description="MFA authorizations found on the peer stream")
    replayed: int = Field(description="peer and stats messages read back")


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
    user_id: int
    username: str
    device_id: int
    device_name: str
    client_ip: str | None = None


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
        MfaEmailSent,
        MobileKeyRegistered,
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
        MfaEmailSent,
        MobileKeyRegistered,
        LoginApproved,
        StatsSample,
        DeadLetter,
    ],
    Field(discriminator="type"),
]

STATS_ADAPTER: TypeAdapter[StatsSample] = TypeAdapter(StatsSample)
PEER_STATE_ADAPTER: TypeAdapter[PeerAuthorized | PeerRevoked] = TypeAdapter(PeerState)
ANY_EVENT_ADAPTER: TypeAdapter[Event] = TypeAdapter(AnyEvent)
