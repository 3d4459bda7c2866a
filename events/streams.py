"""JetStream streams and their set-up. Every service calls `ensure_streams` at start."""
from __future__ import annotations

import dataclasses
import logging

from nats.js import JetStreamContext
from nats.js.api import DiscardPolicy, RetentionPolicy, StorageType, StreamConfig
from nats.js.errors import BadRequestError

from events import subjects

log = logging.getLogger(__name__)

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

STREAM_ALREADY_IN_USE = 10058


async def ensure_streams(js: JetStreamContext, replicas: int = 1) -> None:
    """Create the streams, or bring an existing one to this configuration."""
    for base in ALL_STREAMS:
        config = dataclasses.replace(base, num_replicas=replicas)
        try:
            await js.add_stream(config)
        except BadRequestError as exc:
            if exc.err_code != STREAM_ALREADY_IN_USE:
                raise
            log.info("updating stream %s to the current configuration", config.name)
            await js.update_stream(config)
