"""The gateway's Prometheus metrics: one registry for the process (served on
WGMFA_GATEWAY_METRICS_PORT), the domain metrics an operator alerts on, and the bus's
dead-letter counter."""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram

from events.bus import DEAD_LETTERS

registry = CollectorRegistry()
registry.register(DEAD_LETTERS)

APPLY_SECONDS = Histogram(
    "wgmfa_gateway_apply_seconds",
    "Time the WireGuard interface took to apply a change, by action (authorize, revoke, sync)",
    ["action"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
    registry=registry,
)
APPLY_FAILURES = Counter(
    "wgmfa_gateway_apply_failures",
    "Peer states the gateway could not apply, by action (authorize, revoke, sync); each retry counts",
    ["action"],
    registry=registry,
)
