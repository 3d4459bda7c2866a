"""Settings every process shares; each service extends this with its own model."""
from __future__ import annotations

import sys
from pathlib import Path
from typing import TypeVar

from pydantic import Field, SecretStr, ValidationError
from pydantic_settings import BaseSettings, SettingsConfigDict

from events.streams import StreamLimits


class BusSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="WGMFA_", extra="ignore")

    nats_url: str = "nats://127.0.0.1:4222"
    """Comma-separated NATS server URLs."""
    state_dir: Path = Path(".wgmfa")
    """Where embedded state lives: database, JetStream store, keys."""
    log_level: str = "INFO"
    rpc_timeout_s: float = Field(5.0, gt=0)
    """How long a caller waits for the core's reply."""
    publish_timeout_s: float = Field(5.0, gt=0)
    """How long a JetStream publish waits for its acknowledgement."""
    stream_replicas: int = Field(1, ge=1, le=5)
    """Replicas of each JetStream stream (3 on a three-node cluster)."""
    inbox_prefix: str | None = None
    """Subject prefix for replies and push consumers; default the process's role's own
    (`_INBOX_<role>`), the only one its NATS permissions let it read."""
    events_max_age_s: int = Field(90 * 86400, gt=0)
    events_max_bytes: int = Field(1 << 30, ge=1 << 16)
    """The audit trail keeps at most this many bytes (the oldest go first)."""
    dlq_max_age_s: int = Field(30 * 86400, gt=0)
    dlq_max_bytes: int = Field(256 << 20, ge=1 << 16)
    stats_max_age_s: int = Field(15 * 60, gt=0)
    stats_max_bytes: int = Field(256 << 20, ge=1 << 16)
    peers_max_bytes: int = Field(256 << 20, ge=1 << 16)
    """Peer state is never dropped: beyond this a new authorization is refused."""
    nats_nkey_seed: SecretStr | None = None
    """This process's NATS NKey seed (S…); else WGMFA_NATS_NKEY_FILE, else the role's file
    in the credentials directory."""
    nats_nkey_file: Path | None = None
    """A file holding this process's NKey seed."""
    nats_credentials_dir: Path | None = None
    """Where `wgmfa up` keeps every role's seed (<role>.nk); default <state dir>/nats-credentials."""
    nats_ca_file: Path | None = None
    """CA certificate that signed the servers' TLS certificates (tls:// URLs)."""
    metrics_host: str = "127.0.0.1"
    """The address each service's Prometheus /metrics port listens on."""

    def stream_limits(self) -> StreamLimits:
        return StreamLimits(
            events_max_age_s=self.events_max_age_s, events_max_bytes=self.events_max_bytes,
            dlq_max_age_s=self.dlq_max_age_s, dlq_max_bytes=self.dlq_max_bytes,
            stats_max_age_s=self.stats_max_age_s, stats_max_bytes=self.stats_max_bytes,
            peers_max_bytes=self.peers_max_bytes,
        )

    @property
    def credentials_dir(self) -> Path:
        return self.nats_credentials_dir or self.state_dir / "nats-credentials"

    def nkey_seed(self, role: str) -> str | None:
        """The NKey seed this process authenticates with as `role`, if it has one."""
        if self.nats_nkey_seed is not None:
            return self.nats_nkey_seed.get_secret_value().strip()
        path = self.nats_nkey_file or self.credentials_dir / f"{role}.nk"
        try:
            return path.read_text().strip() or None
        except OSError:
            if self.nats_nkey_file is not None:
                raise
            return None  # not the state directory's owner: the server will say no


class LivenessSettings(BusSettings):
    """The liveness rules (docs/architecture.md, *Liveness*) that the core, the gateways and the reaper must
    agree on."""

    stats_interval: float = Field(30.0, gt=0)
    """Seconds between a gateway's handshake samples (WGMFA_STATS_INTERVAL)."""
    min_threshold_s: int = Field(180, gt=0)
    """The rekey allowance in the threshold floor: an MFA location's peer disconnect
    threshold must be at least this plus two stats intervals."""

    @property
    def threshold_floor_s(self) -> int:
        return int(self.min_threshold_s + 2 * self.stats_interval)


SettingsT = TypeVar("SettingsT", bound=BaseSettings)


def load_settings(cls: type[SettingsT], **overrides: object) -> SettingsT:
    """A process's settings, or its exit (status 2) with every reason they make no sense,
    named as the environment variables the operator sets."""
    try:
        return cls(**overrides)
    except ValidationError as exc:
        print("wgmfa: settings refused:", file=sys.stderr)
        for error in exc.errors():
            field = ".".join(str(part) for part in error.get("loc", ()))
            if field:
                print(f"  WGMFA_{field.upper()}: {error.get('msg')}", file=sys.stderr)
            else:  # a rule between settings; its message names them
                print(f"  {str(error.get('msg')).removeprefix('Value error, ')}", file=sys.stderr)
        sys.exit(2)
