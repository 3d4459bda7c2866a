"""The core's Prometheus metrics: one registry for the process (served on
WGMFA_CORE_METRICS_PORT), the domain metrics an operator alerts on, and the bus's
dead-letter counter."""
from __future__ import annotations

import time
from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector
from sqlalchemy import and_, func
from sqlmodel import col, select

from core_service.db import Database
from core_service.models import Location, VpnSession
from events.bus import DEAD_LETTERS
from schemas.common import LIVE_SESSION_STATES

registry = CollectorRegistry()
registry.register(DEAD_LETTERS)

LOGINS = Counter(
    "wgmfa_logins",
    "MFA logins by method (totp, email, oidc, biometric, mobile_approve) and outcome: success, or why not "
    "(wrong_code, replayed_code, expired, locked_out, attempts_exhausted, ...)",
    ["method", "outcome"],
    registry=registry,
)
LOGIN_SECONDS = Histogram(
    "wgmfa_login_seconds",
    "Time from a login's start to its successful finish, by method (it includes the person typing the code)",
    ["method"],
    buckets=(1, 2.5, 5, 10, 20, 30, 60, 120, 300),
    registry=registry,
)
SESSIONS_REVOKED = Counter(
    "wgmfa_sessions_revoked",
    "VPN sessions the core ended, by reason (admin, replaced, user_disabled; idle, never_connected and lifetime "
    "when it applies the reaper's revokes)",
    ["reason"],
    registry=registry,
)

LIVE_SESSIONS_CACHE_S = 2.0
"""A scrape reads the database at most this often."""


class LiveSessions(Collector):
    """Live (authorized or connected) sessions per location, read from the database on a
    scrape, so that the figure is right after a restart and with several cores."""

    def __init__(self) -> None:
        self.by_location: dict[str, int] = {}
        self._read_at: float | None = None

    async def refresh(self, db: Database) -> None:
        if self._read_at is not None and time.monotonic() - self._read_at < LIVE_SESSIONS_CACHE_S:
            return
        async with db.reader() as session:
            rows = (
                await session.exec(
                    select(Location.name, func.count(col(VpnSession.id)))
                    .outerjoin(
                        VpnSession,
                        and_(col(VpnSession.location_id) == Location.id, col(VpnSession.state).in_(LIVE_SESSION_STATES)),
                    )
                    .group_by(Location.name)
                )
            ).all()
        self.by_location = {name: count for name, count in rows}
        self._read_at = time.monotonic()

    def collect(self) -> Iterator[GaugeMetricFamily]:
        gauge = GaugeMetricFamily("wgmfa_live_sessions", "Live VPN sessions (authorized or connected) per location",
                                  labels=["location"])
        for location, count in sorted(self.by_location.items()):
            gauge.add_metric([location], count)
        yield gauge


LIVE_SESSIONS = LiveSessions()
registry.register(LIVE_SESSIONS)
