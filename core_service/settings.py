from __future__ import annotations

from typing import Literal

from pydantic import SecretStr

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
    """Codes checked per login at most; in a row from one client address, they lock that
    address out for a growing while."""
    mfa_hard_lock_failures: int = 100
    """Failed factors in a row (from any address) that lock a user until an administrator
    unlocks them (NIST SP 800-63B's limit)."""
    max_live_logins: int = 3
    """Live logins per device and location (one per client address; the oldest goes)."""
    totp_issuer: str = "wgmfa"
    default_threshold_s: int = 300
    default_lifetime_s: int = 43200
    default_keepalive_s: int = 25
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

    def resolved_database_url(self) -> str:
        if self.database_url:
            return self.database_url
        return f"sqlite+aiosqlite:///{(self.state_dir / 'core.db').resolve()}"
