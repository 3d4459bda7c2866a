"""Settings every process shares; each service extends this with its own model."""
from __future__ import annotations

from pathlib import Path

from pydantic_settings import BaseSettings, SettingsConfigDict

from events.streams import StreamLimits


class BusSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="WGMFA_", extra="ignore")

    nats_url: str = "nats://127.0.0.1:4222"
    """Comma-separated NATS server URLs."""
    state_dir: Path = Path(".wgmfa")
    """Where embedded state lives: database, JetStream store, keys."""
    log_level: str = "INFO"
    rpc_timeout_s: float = 5.0
    """How long a caller waits for the core's reply."""
    publish_timeout_s: float = 5.0
    """How long a JetStream publish waits for its acknowledgement."""
    stream_replicas: int = 1
    """Replicas of each JetStream stream (3 on a three-node cluster)."""
    inbox_prefix: str = "_INBOX"
    """Subject prefix for replies and push consumers; operators' accounts may be limited
    to their own (e.g. _INBOX_operator)."""
    events_max_age_s: int = 90 * 86400
    events_max_bytes: int = 1 << 30
    """The audit trail keeps at most this many bytes (the oldest go first)."""
    dlq_max_age_s: int = 30 * 86400
    dlq_max_bytes: int = 256 << 20
    stats_max_age_s: int = 15 * 60
    stats_max_bytes: int = 256 << 20
    peers_max_bytes: int = 256 << 20
    """Peer state is never dropped: beyond this a new authorization is refused."""

    def stream_limits(self) -> StreamLimits:
        return StreamLimits(
            events_max_age_s=self.events_max_age_s, events_max_bytes=self.events_max_bytes,
            dlq_max_age_s=self.dlq_max_age_s, dlq_max_bytes=self.dlq_max_bytes,
            stats_max_age_s=self.stats_max_age_s, stats_max_bytes=self.stats_max_bytes,
            peers_max_bytes=self.peers_max_bytes,
        )


class LivenessSettings(BusSettings):
    """The rules of DESIGN §6 that the core, the gateways and the reaper must agree on."""

    stats_interval: float = 30.0
    """Seconds between a gateway's handshake samples (WGMFA_STATS_INTERVAL)."""
    min_threshold_s: int = 180
    """The rekey allowance in the threshold floor: an MFA location's peer disconnect
    threshold must be at least this plus two stats intervals."""

    @property
    def threshold_floor_s(self) -> int:
        return int(self.min_threshold_s + 2 * self.stats_interval)
