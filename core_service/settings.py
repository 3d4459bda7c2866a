from __future__ import annotations

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
    totp_issuer: str = "wgmfa"
    default_threshold_s: int = 300
    default_lifetime_s: int = 43200
    default_keepalive_s: int = 25
    outbox_interval_s: float = 1.0
    publish_wait_s: float = 2.0
    """How long a request waits for its events to be published before it answers anyway
    (the outbox publishes them later)."""

    def resolved_database_url(self) -> str:
        if self.database_url:
            return self.database_url
        return f"sqlite+aiosqlite:///{(self.state_dir / 'core.db').resolve()}"
