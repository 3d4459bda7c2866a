from __future__ import annotations

from typing import Literal

from pydantic import Field, SecretStr

from events.settings import LivenessSettings


class CoreSettings(LivenessSettings):
    database_url: str | None = None
    """SQLAlchemy URL; default SQLite in the state directory. PostgreSQL:
    postgresql+asyncpg://user:password@host:5432/wgmfa"""
    secret_key: SecretStr | None = None
    """Base64 of 32 bytes; encrypts secrets at rest and derives the core's RPC key. Every
    core of one deployment needs the same. Default: <state_dir>/core-secret.key, created
    on first start."""
    auto_migrate: bool = True
    """Upgrade the database schema at start."""
    login_ttl_s: int = 300
    max_failed_attempts: int = 5
    totp_issuer: str = "wgmfa"
    default_threshold_s: int = 300
    default_lifetime_s: int = 43200
    default_keepalive_s: int = 25
    enrollment_session_s: int = Field(600, ge=60, le=86400)
    """How long an enrollment session (the app's cookie) lasts after the token's first use."""
    instance_name: str = Field("wgmfa", min_length=1, max_length=64)
    """The name Defguard's apps show for this deployment."""
    outbox_interval_s: float = 1.0
    publish_wait_s: float = 2.0
    """How long a request waits for its events to be published before it answers anyway
    (the outbox publishes them later)."""

    smtp_host: str | None = None
    """SMTP server for emailed codes; without it, email MFA is not available."""
    smtp_port: int = 25
    smtp_security: Literal["none", "starttls", "tls"] = "none"
    """none, starttls (upgrade after connecting, port 587) or tls (TLS from the start, port 465)."""
    smtp_user: str | None = None
    smtp_password: SecretStr | None = None
    smtp_sender: str = "wgmfa <wgmfa@localhost>"
    smtp_timeout_s: float = 10.0
    email_per_user_limit: int = 3
    """Emailed codes a user may receive per `email_limit_window_s`; then 429."""
    email_limit_window_s: int = 300

    oidc_timeout_s: float = 3.0
    """How long a call to the OpenID provider may take; keep it below WGMFA_RPC_TIMEOUT_S
    so that a slow provider is reported (503) before the caller gives up."""

    def resolved_database_url(self) -> str:
        if self.database_url:
            return self.database_url
        return f"sqlite+aiosqlite:///{(self.state_dir / 'core.db').resolve()}"
