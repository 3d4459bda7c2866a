"""The reaper process: rebuilds what it knows from the streams, follows them, and sweeps."""
from __future__ import annotations

import asyncio
import contextlib
import logging
import math
from datetime import datetime
from typing import Any

from faststream.nats import DeliverPolicy
from pydantic import Field, ValidationError

from events import nats_direct, permissions, streams, subjects
from events.bus import Bus, describe_validation_error
from runtime.clock import Clock, SystemClock
from runtime.metrics import serving_metrics
from runtime.service import cancel_all, every, run_until_signalled
from runtime.settings import LivenessSettings, load_settings
from reaper_worker import metrics
from reaper_worker.liveness import Decision, Liveness, revoke_for
from schemas.common import utcnow, uuid7
from schemas.events import (
    PEER_STATE_ADAPTER,
    STATS_ADAPTER,
    PeerAuthorized,
    PeerRevoked,
    ReaperStarted,
    StatsIntervalMismatch,
    StatsSample,
)

log = logging.getLogger("reaper_worker")


class ReaperSettings(LivenessSettings):
    sweep_interval_s: float = Field(10.0, gt=0)
    """How often the reaper looks for sessions to revoke."""
    reaper_metrics_port: int | None = Field(None, ge=1, le=65535)
    """Serve the reaper's Prometheus /metrics on this port (on metrics_host); none by default."""


class Reaper:
    def __init__(self, settings: ReaperSettings, *, clock: Clock | None = None, bus: Bus | None = None) -> None:
        self.settings = settings
        self.clock = clock or SystemClock()
        self.liveness = Liveness()
        self.bus = bus
        self._own_bus = bus is None
        self._tasks: list[asyncio.Task[None]] = []
        self._mismatched: set[tuple[int, str]] = set()
        self._reports: set[asyncio.Task[Any]] = set()
        self._subscriptions: list[Any] = []
        self.ready = asyncio.Event()
        self.revoked: list[PeerRevoked] = []  # what this reaper published, newest last
        self.reaper_id = f"reaper-{uuid7().hex[-8:]}"

    async def start(self) -> None:
        if self.bus is None:
            self.bus = await Bus.connect_as(self.settings, permissions.REAPER, "reaper", registry=metrics.registry)
        await self.bus.wait_for_streams(streams.PEERS.name, streams.STATS.name)
        peers = await self._subscribe(subjects.PEER_ALL, streams.PEERS.name, DeliverPolicy.LAST_PER_SUBJECT)
        stats = await self._subscribe(subjects.STATS_ALL, streams.STATS.name, DeliverPolicy.ALL)
        await self._replay([(peers, streams.PEERS.name), (stats, streams.STATS.name)])
        self._tasks = [
            asyncio.create_task(self._follow(peers), name="reaper peers"),
            asyncio.create_task(self._follow(stats), name="reaper stats"),
            asyncio.create_task(every(self.settings.sweep_interval_s, self.sweep, "sweep", log), name="reaper sweep"),
        ]
        self.ready.set()
        log.info("reaper ready: watching %s MFA authorizations", len(self.liveness.authorizations))

    async def _subscribe(self, subject: str, stream: str, policy: DeliverPolicy) -> Any:
        assert self.bus is not None
        # each reaper its own ordered consumer: every reaper reads every sample, with the
        # server's timestamps and stream sequences (nats_direct says why not FastStream)
        sub = await nats_direct.ordered_subscribe(self.bus.broker, subject, stream, policy)
        self._subscriptions.append(sub)
        return sub

    async def _replay(self, subs: list[tuple[Any, str]]) -> None:
        """Read what the streams held when the consumers were made, then feed it with
        arrival times derived from the server's timestamps relative to the newest message:
        those times are never later than the truth, so ages are never over-estimated and
        nothing is revoked early."""
        assert self.bus is not None
        backlog: list[tuple[nats_direct.StreamMsg, Any]] = []
        for sub, stream in subs:
            state = await nats_direct.stream_state(self.bus.broker, stream)
            if not state.messages:
                continue
            while True:  # the filter covers the whole stream, so its last message comes
                msg = await sub.next_msg(timeout=10)
                backlog.append((msg, self._decode(msg)))
                if msg.metadata.sequence.stream >= state.last_seq:
                    break
        # The server's time now: the timestamp it gives our own start event.
        now = self.clock.monotonic()
        server_now = await self._announce_start(backlog)
        if server_now is None:  # could not tell: the newest message is a safe stand-in
            server_now = max((msg.metadata.timestamp for msg, _ in backlog), default=None)
        backlog.sort(key=lambda item: item[0].metadata.timestamp)
        for msg, item in backlog:
            if item is not None:
                assert server_now is not None
                self._apply(item, msg, now - max((server_now - msg.metadata.timestamp).total_seconds(), 0.0))
        log.info("replayed %s messages from the peer and stats streams", len(backlog))

    async def _announce_start(self, backlog: list[tuple[nats_direct.StreamMsg, Any]]) -> datetime | None:
        assert self.bus is not None
        watching = sum(1 for _, item in backlog if isinstance(item, PeerAuthorized) and item.threshold_s is not None)
        event = ReaperStarted(reaper_id=self.reaper_id, watching=watching, replayed=len(backlog))
        try:
            ack = await self.bus.publish_event(event)
            return await nats_direct.server_time_of(self.bus.broker, streams.EVENTS.name, ack.seq)
        except Exception as exc:
            log.warning("could not read the server's time: %s", exc)
            return None

    def _decode(self, msg: nats_direct.StreamMsg) -> PeerAuthorized | PeerRevoked | StatsSample | None:
        try:
            if msg.subject.startswith(subjects.PEER_PREFIX + "."):
                return PEER_STATE_ADAPTER.validate_json(msg.data)
            return STATS_ADAPTER.validate_json(msg.data)
        except ValidationError as exc:
            assert self.bus is not None
            task = asyncio.create_task(
                self.bus.dead_letter(msg.subject, msg.data, msg.headers, f"undecodable: {describe_validation_error(exc)}")
            )
            self._tasks.append(task)
            return None

    def _apply(self, item: PeerAuthorized | PeerRevoked | StatsSample, msg: nats_direct.StreamMsg, arrived_at: float) -> None:
        if isinstance(item, StatsSample):
            self._check_interval(item)
            self.liveness.on_sample(item, arrived_at)
        else:
            self.liveness.on_peer_state(item, msg.metadata.sequence.stream, arrived_at)

    def _check_interval(self, sample: StatsSample) -> None:
        gateway = (sample.location_id, sample.gateway_id)
        interval = sample.stats_interval_s
        if interval is None or math.isclose(interval, self.settings.stats_interval) or gateway in self._mismatched:
            return
        self._mismatched.add(gateway)
        log.warning(
            "gateway %s of location %s samples every %g s, this reaper assumes WGMFA_STATS_INTERVAL=%g s: "
            "give every gateway and reaper the same interval", sample.gateway_id, sample.location_id, interval,
            self.settings.stats_interval,
        )
        if self.bus is not None:
            event = StatsIntervalMismatch(
                reaper_id=self.reaper_id, location_id=sample.location_id, gateway_id=sample.gateway_id,
                gateway_interval_s=interval, reaper_interval_s=self.settings.stats_interval,
            )
            task = asyncio.create_task(self._report(event))
            self._reports.add(task)
            task.add_done_callback(self._reports.discard)

    async def _report(self, event: StatsIntervalMismatch) -> None:
        assert self.bus is not None
        try:
            await self.bus.publish_event(event)
        except Exception as exc:  # the warning above is logged; the event is a courtesy
            log.warning("could not publish %s: %s", event.type, exc)

    async def _follow(self, sub: Any) -> None:
        while True:
            try:
                msg = await sub.next_msg(timeout=None)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # connection trouble: the ordered consumer resets itself
                log.warning("reading %s: %s", sub.subject, exc)
                await asyncio.sleep(1)
                continue
            metrics.INGEST_LAG.set(max((utcnow() - msg.metadata.timestamp).total_seconds(), 0.0))
            item = self._decode(msg)
            if item is not None:
                self._apply(item, msg, self.clock.monotonic())

    async def sweep(self) -> int:
        """Revoke every authorization that is due; returns how many revokes went out."""
        decisions = self.liveness.due(self.clock.monotonic())
        limit = asyncio.Semaphore(32)  # revokes of different devices go out side by side
        results = await asyncio.gather(*(self._revoke(decision, limit) for decision in decisions))
        self.liveness.forget_handshakes_of_unknown_peers()
        metrics.sweep_done()
        return sum(results)

    async def _revoke(self, decision: Decision, limit: asyncio.Semaphore) -> bool:
        assert self.bus is not None
        auth = decision.authorization
        revoke = revoke_for(decision)
        async with limit:
            try:
                await self.bus.publish(subjects.peer(*auth.key), revoke, expected_last_subject_seq=auth.sequence)
            except Exception as exc:
                if not nats_direct.is_wrong_last_sequence(exc):
                    log.warning("revoking %s failed, will retry: %s", auth.key, exc)
                    return False
                # a newer state (another reaper's revoke, a new authorization) is already last
                log.info("location %s device %s generation %s: already superseded", *auth.key, auth.state.generation)
                auth.revoked = True
                return False
        auth.revoked = True
        self.revoked.append(revoke)
        metrics.REVOKES.labels(decision.reason.value).inc()
        log.info(
            "revoked location %s device %s generation %s: %s (quiet for %.0f s)",
            *auth.key, auth.state.generation, decision.reason.value, decision.quiet_for_s,
        )
        return True

    async def stop(self) -> None:
        await cancel_all(self._tasks)
        for sub in self._subscriptions:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()
        if self.bus is not None and self._own_bus:
            await self.bus.close()


async def main() -> None:
    settings = load_settings(ReaperSettings)
    async with serving_metrics(metrics.registry, settings.metrics_host, settings.reaper_metrics_port):
        await run_until_signalled("reaper", settings, Reaper(settings))
