"""Transactional outbox: events are written with the change that causes them and
published after the commit, retried until NATS acknowledges them."""
from __future__ import annotations

import asyncio
import logging
from datetime import timedelta
from typing import Protocol

from sqlmodel import col, delete, select, update
from sqlmodel.ext.asyncio.session import AsyncSession

from core_service.db import Database
from core_service.models import Outbox
from events.clock import Clock
from schemas.events import ANY_EVENT_ADAPTER, Event, PeerAuthorized, PeerRevoked

log = logging.getLogger(__name__)

KIND_PEER = "peer"
KIND_EVENT = "event"


def enqueue_peer_state(session: AsyncSession, state: PeerAuthorized | PeerRevoked) -> None:
    session.add(Outbox(kind=KIND_PEER, event_type=state.type, payload=state.model_dump_json()))


def enqueue_event(session: AsyncSession, event: Event) -> None:
    session.add(Outbox(kind=KIND_EVENT, event_type=event.type, payload=event.model_dump_json()))


class EventSink(Protocol):
    """Where the relay publishes: the bus in production, a list in unit tests."""

    async def publish_peer_state(self, state: PeerAuthorized | PeerRevoked) -> bool: ...

    async def publish_event(self, event: Event) -> object: ...


class OutboxRelay:
    def __init__(self, db: Database, sink: EventSink, clock: Clock, *, batch: int = 500) -> None:
        self.db = db
        self.sink = sink
        self.clock = clock
        self.batch = batch
        self._lock = asyncio.Lock()

    async def flush(self) -> int:
        """Publish every unpublished row; returns how many were published."""
        async with self._lock:
            total = 0
            while True:
                async with self.db.reader() as session:
                    rows = (
                        await session.exec(
                            select(Outbox).where(col(Outbox.published_at).is_(None)).order_by(col(Outbox.id)).limit(self.batch)
                        )
                    ).all()
                if not rows:
                    return total
                done = await self._publish(rows)
                if done:
                    async with self.db.transaction() as session:
                        await session.exec(
                            update(Outbox).where(col(Outbox.id).in_(done)).values(published_at=self.clock.now())
                        )
                total += len(done)
                if len(done) < len(rows):
                    return total

    async def _publish(self, rows: list[Outbox]) -> list[int]:
        # Peer states of one device go out in order; everything else concurrently.
        groups: dict[object, list[tuple[int, Event]]] = {}
        for row in rows:
            event = ANY_EVENT_ADAPTER.validate_json(row.payload)
            if isinstance(event, (PeerAuthorized, PeerRevoked)):
                key: object = (event.location_id, event.device_id)
            else:
                key = row.id
            groups.setdefault(key, []).append((row.id, event))  # type: ignore[arg-type]
        done: list[int] = []

        async def publish_group(group: list[tuple[int, Event]]) -> None:
            for row_id, event in group:
                try:
                    if isinstance(event, (PeerAuthorized, PeerRevoked)):
                        await self.sink.publish_peer_state(event)
                    else:
                        await self.sink.publish_event(event)
                except Exception as exc:
                    log.warning("outbox: publishing %s (row %s) failed, will retry: %s", event.type, row_id, exc)
                    return
                done.append(row_id)

        await asyncio.gather(*(publish_group(g) for g in groups.values()))
        return done

    async def run(self, interval_s: float) -> None:
        """Retry what failed, and purge what was published a day ago."""
        while True:
            await asyncio.sleep(interval_s)
            try:
                await self.flush()
                async with self.db.transaction() as session:
                    await session.exec(
                        delete(Outbox).where(col(Outbox.published_at) < self.clock.now() - timedelta(days=1))
                    )
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("outbox relay: %s", exc)
