"""SQL tables (sqlmodel). Every datetime is timezone-aware UTC; secrets are stored
encrypted (`*_enc`) or hashed (`*_hash`)."""
from __future__ import annotations

import uuid
from datetime import datetime

from sqlalchemy import BigInteger, Column, Index, JSON, UniqueConstraint, text
from sqlmodel import Field, SQLModel

from schemas.common import utcnow

_LIVE_SESSION = text("state IN ('authorized', 'connected')")
_LIVE_LOGIN = text("state IN ('pending', 'approved')")
_UNPUBLISHED = text("published_at IS NULL")


class User(SQLModel, table=True):
    __tablename__ = "user"
    __table_args__ = (UniqueConstraint("oidc_issuer", "oidc_subject", name="uq_user_oidc_identity"),)

    id: int | None = Field(default=None, primary_key=True)
    username: str = Field(max_length=64, unique=True)
    email: str = Field(max_length=254)
    is_active: bool = True
    totp_secret_enc: str | None = None
    totp_pending_secret_enc: str | None = Field(default=None, description="enrolled, not yet confirmed")
    totp_last_step: int | None = Field(default=None, description="the last accepted TOTP time step")
    email_mfa_enabled: bool = False
    mfa_failures: int = Field(default=0, description="consecutive failed factors, reset on success")
    mfa_locked_until: datetime | None = None
    oidc_issuer: str | None = Field(default=None, max_length=512)
    oidc_subject: str | None = Field(default=None, max_length=255)
    created_at: datetime = Field(default_factory=utcnow)
    deleted_at: datetime | None = Field(
        default=None, description="a tombstone: the row stays for the sessions that name it, under a freed name"
    )


class Device(SQLModel, table=True):
    __tablename__ = "device"
    __table_args__ = (UniqueConstraint("user_id", "name", name="uq_device_user_name"),)

    id: int | None = Field(default=None, primary_key=True)
    user_id: int = Field(foreign_key="user.id", index=True)
    name: str = Field(max_length=64)
    pubkey: str = Field(max_length=64, unique=True)
    mobile_registration_until: datetime | None = Field(
        default=None, description="until when its phone app may register a signing key"
    )
    mobile_registration_code_hash: str | None = Field(
        default=None, max_length=64, description="keyed hash of the one-time code the allowance printed"
    )
    mobile_registration_failures: int = Field(default=0, description="wrong codes against the current allowance")
    created_at: datetime = Field(default_factory=utcnow)
    removed_at: datetime | None = Field(
        default=None,
        description="a tombstone: ids name peer subjects, so a removed device keeps its id (never reused) "
        "and gives up its name and public key",
    )


class MobileKey(SQLModel, table=True):
    __tablename__ = "mobile_key"

    id: int | None = Field(default=None, primary_key=True)
    user_id: int = Field(foreign_key="user.id", index=True)
    device_id: int = Field(foreign_key="device.id", unique=True)
    public_key: str = Field(max_length=64, unique=True)
    created_at: datetime = Field(default_factory=utcnow)


class Location(SQLModel, table=True):
    __tablename__ = "location"

    id: int | None = Field(default=None, primary_key=True)
    name: str = Field(max_length=64, unique=True)
    endpoint: str = Field(max_length=255)
    listen_port: int
    network: str = Field(max_length=64)
    gateway_address: str = Field(max_length=64)
    wg_public_key: str = Field(max_length=64)
    wg_private_key_enc: str
    sealing_public_key: str = Field(max_length=64)
    sealing_private_key_enc: str
    mfa_mode: str = Field(max_length=16)
    peer_disconnect_threshold_s: int = 300
    session_lifetime_s: int = 43200
    keepalive_s: int = 25
    allowed_groups: list[str] = Field(default_factory=list, sa_column=Column(JSON, nullable=False))
    allowed_ips: list[str] = Field(
        default_factory=list,
        sa_column=Column(JSON, nullable=False, server_default="[]"),
        description="networks (CIDR) clients route through the gateway besides the location's own",
    )
    dns: list[str] = Field(
        default_factory=list, sa_column=Column(JSON, nullable=False, server_default="[]"),
        description="DNS servers (IP addresses) clients use",
    )
    created_at: datetime = Field(default_factory=utcnow)
    removed_at: datetime | None = Field(default=None, description="a tombstone, as for devices")


class LocationDevice(SQLModel, table=True):
    __tablename__ = "location_device"
    __table_args__ = (UniqueConstraint("location_id", "address", name="uq_location_device_address"),)

    location_id: int = Field(foreign_key="location.id", primary_key=True)
    device_id: int = Field(foreign_key="device.id", primary_key=True)
    address: str = Field(max_length=64)
    generation: int = Field(default=0, description="the last peer-state generation issued")
    created_at: datetime = Field(default_factory=utcnow)


class MfaLogin(SQLModel, table=True):
    """A device may have a few live logins at a location (one per client address), so
    that a start from elsewhere does not end the owner's."""

    __tablename__ = "mfa_login"
    __table_args__ = (
        Index("ix_mfa_login_live", "location_id", "device_id", sqlite_where=_LIVE_LOGIN, postgresql_where=_LIVE_LOGIN),
        Index("uq_mfa_login_oidc_state", "oidc_state_hash", unique=True),
    )

    id: uuid.UUID = Field(primary_key=True)
    token_hash: str = Field(max_length=64, unique=True)
    location_id: int = Field(foreign_key="location.id")
    device_id: int = Field(foreign_key="device.id", index=True)
    user_id: int = Field(foreign_key="user.id", index=True)
    method: str = Field(max_length=16)
    state: str = Field(max_length=16)
    challenge: str | None = Field(default=None, max_length=128)
    email_code_hash: str | None = Field(default=None, max_length=64)
    attempts: int = Field(default=0, description="codes taken for checking, spent before each check")
    failed_attempts: int = 0
    client_ip: str | None = Field(default=None, max_length=64)
    created_at: datetime = Field(default_factory=utcnow)
    expires_at: datetime = Field(index=True)
    finished_at: datetime | None = None
    # OIDC (method 2): the authorization request in flight, so that any core can take its
    # callback; state and browser secret hashed, the PKCE verifier encrypted, all single use
    oidc_state_hash: str | None = Field(default=None, max_length=64)
    oidc_browser_hash: str | None = Field(default=None, max_length=64)
    oidc_nonce: str | None = Field(default=None, max_length=128)
    oidc_verifier_enc: str | None = None


class MfaAddressFailures(SQLModel, table=True):
    """Consecutive failed factors of a user from one client address: they throttle that
    address before the user's own count (in `user`) locks the user for good."""

    __tablename__ = "mfa_address_failures"

    user_id: int = Field(foreign_key="user.id", primary_key=True)
    client_ip: str = Field(max_length=64, primary_key=True, description="'' when the address is unknown")
    failures: int = 0
    locked_until: datetime | None = None


class VpnSession(SQLModel, table=True):
    __tablename__ = "vpn_session"
    __table_args__ = (
        UniqueConstraint("location_id", "device_id", "generation", name="uq_vpn_session_generation"),
        Index(
            "uq_vpn_session_live",
            "location_id",
            "device_id",
            unique=True,
            sqlite_where=_LIVE_SESSION,
            postgresql_where=_LIVE_SESSION,
        ),
    )

    id: int | None = Field(default=None, primary_key=True)
    generation: int
    location_id: int = Field(foreign_key="location.id")
    device_id: int = Field(foreign_key="device.id", index=True)
    user_id: int = Field(foreign_key="user.id", index=True)
    login_id: uuid.UUID | None = None
    method: str = Field(max_length=16)
    psk_enc: str | None = Field(default=None, description="deleted on revoke")
    state: str = Field(max_length=16)
    authorized_at: datetime
    connected_at: datetime | None = None
    expires_at: datetime
    revoked_at: datetime | None = None
    revoke_reason: str | None = Field(default=None, max_length=32)


class Enrollment(SQLModel, table=True):
    """An enrollment token an admin issued for one user: single use for `start`, which
    opens a session (carried by the app's cookie) until `session_deadline`."""

    __tablename__ = "enrollment"

    id: uuid.UUID = Field(primary_key=True)
    token_hash: str = Field(max_length=64, unique=True)
    user_id: int = Field(foreign_key="user.id", index=True)
    device_name: str | None = Field(default=None, max_length=64, description="the name the admin suggested")
    created_at: datetime = Field(default_factory=utcnow)
    expires_at: datetime = Field(description="the token must be used before this")
    started_at: datetime | None = None
    session_deadline: datetime | None = None
    revoked_at: datetime | None = None
    setup_method: str | None = Field(default=None, max_length=16, description="the factor being set up: totp or email")
    email_code_hash: str | None = Field(default=None, max_length=64)
    email_codes_sent: int = Field(default=0, description="setup codes mailed in this session")
    setup_failures: int = Field(default=0, description="wrong codes while setting up a factor")


class PollingToken(SQLModel, table=True):
    """The token a Defguard app polls its device's configuration with (one per device)."""

    __tablename__ = "polling_token"

    id: int | None = Field(default=None, primary_key=True)
    token_hash: str = Field(max_length=64, unique=True)
    device_id: int = Field(foreign_key="device.id", unique=True)
    created_at: datetime = Field(default_factory=utcnow)


class Outbox(SQLModel, table=True):
    """Messages committed with the change that caused them, published after the commit."""

    __tablename__ = "outbox"
    __table_args__ = (Index("ix_outbox_unpublished", "id", sqlite_where=_UNPUBLISHED, postgresql_where=_UNPUBLISHED),)

    id: int | None = Field(default=None, primary_key=True)
    kind: str = Field(max_length=16, description="peer: compare-and-set on the peer subject; event: audit")
    event_type: str = Field(max_length=64)
    payload: str
    created_at: datetime = Field(default_factory=utcnow)
    published_at: datetime | None = None


class OidcProvider(SQLModel, table=True):
    """The company's OpenID provider (one per deployment), as its discovery document
    described it when an admin set it."""

    __tablename__ = "oidc_provider"

    id: int | None = Field(default=None, primary_key=True)
    issuer: str = Field(max_length=512)
    client_id: str = Field(max_length=255)
    client_secret_enc: str
    display_name: str = Field(max_length=64)
    scopes: str = Field(max_length=255)
    redirect_uri: str = Field(max_length=512)
    authorization_endpoint: str = Field(max_length=512)
    token_endpoint: str = Field(max_length=512)
    userinfo_endpoint: str | None = Field(default=None, max_length=512)
    jwks_uri: str = Field(max_length=512)
    jwks: str = Field(description="the provider's key set (JSON), refreshed on an unknown key id")
    signing_algs: list[str] = Field(default_factory=list, sa_column=Column(JSON, nullable=False))
    iss_parameter_supported: bool = False
    updated_at: datetime = Field(default_factory=utcnow)
class PeerStat(SQLModel, table=True):
    """The latest sample of each peer from each gateway, for `sessions --live`. Every core
    writes what it consumes from the shared stats consumer, so any core answers alike."""

    __tablename__ = "peer_stat"

    location_id: int = Field(primary_key=True)
    gateway_id: str = Field(primary_key=True, max_length=64)
    pubkey: str = Field(primary_key=True, max_length=64)
    endpoint: str | None = Field(default=None, max_length=128)
    handshake_at: datetime | None = Field(default=None, description="the latest handshake, on the core's clock")
    rx_bytes: int = Field(default=0, sa_column=Column(BigInteger, nullable=False, server_default="0"))
    tx_bytes: int = Field(default=0, sa_column=Column(BigInteger, nullable=False, server_default="0"))
    sampled_at: datetime = Field(index=True, description="when the core received it, on its clock")
