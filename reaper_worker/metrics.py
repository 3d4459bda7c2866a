"""The reaper's Prometheus metrics: one registry for the process (served on
WGMFA_REAPER_METRICS_PORT), the domain metrics an operator alerts on, and the bus's
dead-letter counter."""
from __future__ import annotations

import time

from prometheus_client import CollectorRegistry, Counter, Gauge

from events.bus import DEAD_LETTERS

registry = CollectorRegistry()
registry.register(DEAD_LETTERS)

REVOKES = Counter(
    "wgmfa_reaper_revokes", "Peers the reaper revoked, by reason (idle, never_connected, lifetime)", ["reason"],
    registry=registry,
)
INGEST_LAG = Gauge(
    "wgmfa_reaper_ingest_lag_seconds",
    "How long the last peer-state or stats message the reaper read had been on the stream (by the server's clock)",
    registry=registry,
)

_last_sweep = time.monotonic()  # the process's start, until the first sweep finishes


def sweep_done() -> None:
    global _last_sweep
    _last_sweep = time.monotonic()


SWEEP_AGE = Gauge(
    "wgmfa_reaper_sweep_age_seconds",
    "Seconds since the reaper last finished a sweep (alert when well above WGMFA_SWEEP_INTERVAL_S: revokes are late)",
    registry=registry,
)
SWEEP_AGE.set_function(lambda: time.monotonic() - _last_sweep)
