"""JetStream streams and their limits; the core declares them at start (events.nats_direct)."""
from __future__ import annotations

import dataclasses

from faststream.nats import DiscardPolicy, RetentionPolicy, StorageType, StreamConfig

from events import subjects


DAY = 24 * 3600

PEERS = StreamConfig(
    name="WGMFA_PEERS",
    description="desired peer state per location and device; one message kept per subject",
    subjects=[subjects.PEER_ALL],
    retention=RetentionPolicy.LIMITS,
    max_msgs_per_subject=1,
    discard=DiscardPolicy.OLD,
    storage=StorageType.FILE,
    duplicate_window=120,
)

STATS = StreamConfig(
    name="WGMFA_STATS",
    description="gateway handshake samples",
    subjects=[subjects.STATS_ALL],
    retention=RetentionPolicy.LIMITS,
    max_age=15 * 60,
    storage=StorageType.FILE,
    duplicate_window=60,
)

EVENTS = StreamConfig(
    name="WGMFA_EVENTS",
    description="the audit trail",
    subjects=[subjects.EVENTS_ALL],
    retention=RetentionPolicy.LIMITS,
    max_age=90 * DAY,
    storage=StorageType.FILE,
    duplicate_window=120,
)

DLQ = StreamConfig(
    name="WGMFA_DLQ",
    description="messages a consumer could not decode or process, with the reason",
    subjects=[subjects.DLQ_ALL],
    retention=RetentionPolicy.LIMITS,
    max_age=30 * DAY,
    storage=StorageType.FILE,
    duplicate_window=120,
)

ALL_STREAMS = (PEERS, STATS, EVENTS, DLQ)


@dataclasses.dataclass(frozen=True)
class StreamLimits:
    """Age and byte limits of the streams (WGMFA_*_MAX_AGE_S, WGMFA_*_MAX_BYTES). Every
    stream is bounded in bytes, so that nothing a client can cause (an anonymous `start`
    writes an audit event) grows the disk without bound: the audit trail, the DLQ and the
    stats drop their oldest messages; the peer state refuses new ones instead, since
    dropping one would take a live peer off its gateways."""

    events_max_age_s: int = 90 * DAY
    events_max_bytes: int = 1 << 30
    dlq_max_age_s: int = 30 * DAY
    dlq_max_bytes: int = 256 << 20
    stats_max_age_s: int = 15 * 60
    stats_max_bytes: int = 256 << 20
    peers_max_bytes: int = 256 << 20

    def apply(self, config: StreamConfig) -> StreamConfig:
        if config.name == PEERS.name:
            return dataclasses.replace(config, max_bytes=self.peers_max_bytes, discard=DiscardPolicy.NEW)
        age, size = {
            EVENTS.name: (self.events_max_age_s, self.events_max_bytes),
            DLQ.name: (self.dlq_max_age_s, self.dlq_max_bytes),
            STATS.name: (self.stats_max_age_s, self.stats_max_bytes),
        }[config.name]  # type: ignore[index]
        return dataclasses.replace(config, max_age=age, max_bytes=size, discard=DiscardPolicy.OLD)
