from __future__ import annotations

from typing import Literal

from pydantic import Field, SecretStr, model_validator

from runtime.settings import LivenessSettings

# PostgreSQL connections a core keeps: the requests of one client-facing subject it handles
# at once (events.bus.RPC_CONCURRENCY: a login is on one of them at a time), and a few
# for its background work (the outbox, its consumers, housekeeping)
DATABASE_POOL_SIZE = 20


class CoreSettings(LivenessSettings):
    database_url: str | None = None
    """SQLAlchemy URL; default SQLite in the state directory. PostgreSQL:
    postgresql+asyncpg://user:password@host:5432/wgmfa"""
    secret_key: SecretStr | None = None
    """Base64 of 32 bytes; encrypts secrets at rest and derives the core's RPC key. Every
    core of one deployment needs the same. Default: <state_dir>/core-secret.key, created
    on first start."""
    database_pool_size: int = Field(DATABASE_POOL_SIZE, ge=1, le=1000)
    """PostgreSQL only: connections the core keeps open; a busy moment opens up to as many
    again, each closed once its transaction is done. PostgreSQL starts a process for each
    connection, so a pool smaller than the core's steady load opens and closes them all
    the time (each new one also prepares the login's statements again)."""
    sqlite_inline: bool = True
    """SQLite only: run statements on the core's event loop instead of through aiosqlite's
    thread, write transactions on one connection kept for them and committed together when
    they run at the same time (one COMMIT and one fsync for the group; each returns only
    once its writes are committed), and a login's statements straight on SQLite's driver
    (about 3x less core CPU per login). For one core process per
    SQLite file, as `wgmfa up` runs it; set false when several core processes share one
    file, or a statement waiting for another process's lock holds up every request."""
    core_metrics_port: int | None = Field(None, ge=1, le=65535)
    """Serve the core's Prometheus /metrics on this port (on metrics_host); none by default."""
    auto_migrate: bool = True
    """Upgrade the database schema at start."""
    login_ttl_s: int = Field(300, ge=1, le=86400)
    max_failed_attempts: int = Field(5, ge=1, le=100)
    """Codes checked per login at most; in a row from one client address, they lock that
    address out for a growing while."""
    mfa_hard_lock_failures: int = Field(100, ge=1)
    """Failed factors in a row (from any address) that lock a user until an administrator
    unlocks them (NIST SP 800-63B's limit)."""
    max_live_logins: int = Field(3, ge=1, le=100)
    """Live logins per device and location (one per client address; the oldest goes)."""
    totp_issuer: str = "wgmfa"
    default_threshold_s: int = Field(300, gt=0)
    default_lifetime_s: int = Field(43200, gt=0)
    default_keepalive_s: int = Field(25, ge=0, le=65535)
    enrollment_session_s: int = Field(600, ge=60, le=86400)
    """How long an enrollment session (the app's cookie) lasts after the token's first use."""
    instance_name: str = Field("wgmfa", min_length=1, max_length=64)
    """The name Defguard's apps show for this deployment."""
    outbox_interval_s: float = Field(1.0, gt=0)
    publish_wait_s: float = Field(2.0, ge=0)
    """How long a request waits for its events to be published before it answers anyway
    (the outbox publishes them later)."""

    smtp_host: str | None = None
    """SMTP server for emailed codes; without it, email MFA is not available."""
    smtp_port: int = Field(25, ge=1, le=65535)
    smtp_security: Literal["none", "starttls", "tls"] = "none"
    """none, starttls (upgrade after connecting, port 587) or tls (TLS from the start, port 465)."""
    smtp_user: str | None = None
    smtp_password: SecretStr | None = None
    smtp_sender: str = "wgmfa <wgmfa@localhost>"
    smtp_timeout_s: float = Field(10.0, gt=0)
    email_per_user_limit: int = Field(3, ge=1)
    """Emailed codes a user may receive per `email_limit_window_s`; then 429."""
    email_limit_window_s: int = Field(300, gt=0)

    @model_validator(mode="after")
    def _consistent(self) -> "CoreSettings":
        if self.default_threshold_s < self.threshold_floor_s:
            raise ValueError(
                f"WGMFA_DEFAULT_THRESHOLD_S ({self.default_threshold_s} s) is below the threshold floor of "
                f"{self.threshold_floor_s} s (WGMFA_MIN_THRESHOLD_S + 2 x WGMFA_STATS_INTERVAL): every new location "
                "would be refused"
            )
        if self.default_lifetime_s < self.default_threshold_s:
            raise ValueError("WGMFA_DEFAULT_LIFETIME_S is shorter than WGMFA_DEFAULT_THRESHOLD_S")
        if self.mfa_hard_lock_failures < self.max_failed_attempts:
            raise ValueError("WGMFA_MFA_HARD_LOCK_FAILURES is below WGMFA_MAX_FAILED_ATTEMPTS")
        return self

    oidc_timeout_s: float = 3.0
    """How long a call to the OpenID provider may take; keep it below WGMFA_RPC_TIMEOUT_S
    so that a slow provider is reported (503) before the caller gives up."""

    def resolved_database_url(self) -> str:
        if self.database_url:
            return self.database_url
        return f"sqlite+aiosqlite:///{(self.state_dir / 'core.db').resolve()}"
