"""Transactional outbox: events are written with the change that causes them and
published after the commit, retried until NATS acknowledges them."""
from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from datetime import timedelta
from typing import Protocol, Sequence

from sqlalchemy import insert
from sqlmodel import col, delete, func, select, update
from sqlmodel.ext.asyncio.session import AsyncSession

from core_service.db import Database, before_commit, prepared
from core_service.models import Outbox
from runtime.clock import Clock
from schemas.common import utcnow
from schemas.events import ANY_EVENT_ADAPTER, Event, LoginApproved, PeerAuthorized, PeerRevoked

log = logging.getLogger(__name__)

KIND_PEER = "peer"
KIND_EVENT = "event"
KIND_NOTIFY = "notify"
PENDING = "outbox_rows"  # session.info key: the rows this transaction adds
OUTBOX = Outbox.__table__
_INSERT = prepared(insert(OUTBOX).returning(OUTBOX.c.id))


@dataclass
class PendingRow:
    """An outbox row this transaction writes; `id` once written (just before the commit)."""

    kind: str
    event_type: str
    payload: str
    event: Event | None = None  # what `payload` encodes: published as is, not decoded again
    id: int | None = None


async def _write_pending(session: AsyncSession) -> None:
    """A transaction's outbox rows, in one INSERT just before its commit; their ids (in
    the order they were queued: the relay publishes a device's peer states in id order)."""
    rows: list[PendingRow] = session.info.get(PENDING, [])
    if not rows:
        return
    now = utcnow()
    values = [{"kind": r.kind, "event_type": r.event_type, "payload": r.payload, "created_at": now} for r in rows]
    # One statement (SQLAlchemy's insertmanyvalues), whatever the number of rows. Rows of
    # one INSERT take increasing ids in the order of its VALUES (SQLite and PostgreSQL
    # insert them one after the other); RETURNING's own order is not promised, hence the sort.
    result = await session.exec(_INSERT, params=values)
    for row, row_id in zip(rows, sorted(result.scalars().all()), strict=True):
        row.id = row_id


def _enqueue(session: AsyncSession, row: PendingRow) -> None:
    session.info.setdefault(PENDING, []).append(row)
    before_commit(session, PENDING, _write_pending)


def enqueue_peer_state(session: AsyncSession, state: PeerAuthorized | PeerRevoked) -> None:
    _enqueue(session, PendingRow(KIND_PEER, state.type, state.model_dump_json(), state))


def enqueue_event(session: AsyncSession, event: Event) -> None:
    _enqueue(session, PendingRow(KIND_EVENT, event.type, event.model_dump_json(), event))


def enqueue_notify(session: AsyncSession, event: LoginApproved) -> None:
    """A wake-up on core NATS (no stream), sent after the commit like everything else."""
    _enqueue(session, PendingRow(KIND_NOTIFY, event.type, event.model_dump_json(), event))


def pending_rows(session: AsyncSession) -> list[PendingRow]:
    """The rows this transaction queued; their ids are set once it has committed."""
    return list(session.info.get(PENDING, []))


class _Row(Protocol):
    @property
    def id(self) -> int | None: ...

    @property
    def payload(self) -> str: ...


class EventSink(Protocol):
    """Where the relay publishes events and wake-ups: the bus in production, a list in unit tests."""

    async def publish_event(self, event: Event) -> object: ...

    async def notify_login_approved(self, event: LoginApproved) -> None: ...


class PeerStateSink(Protocol):
    """Where the relay publishes peer state: the peer log (compare-and-set) in production."""

    async def publish_peer_state(self, state: PeerAuthorized | PeerRevoked) -> bool: ...


class OutboxRelay:
    """Publishes outbox rows. A transaction's own rows go out right after its commit
    (`publish`); the background loop retries whatever is still unpublished a round later."""

    def __init__(self, db: Database, sink: EventSink, peers: PeerStateSink, clock: Clock, *, batch: int = 500) -> None:
        self.db = db
        self.sink = sink
        self.peers = peers
        self.clock = clock
        self.batch = batch
        self._lock = asyncio.Lock()
        self._seen_pending = 0  # the newest unpublished row id seen by the last round
        # Rows published but not yet marked: marking them in one batch per round keeps a
        # write transaction off every request. A crash before the mark republishes them,
        # which NATS deduplicates by Nats-Msg-Id.
        self._unmarked: set[int] = set()

    async def publish(self, rows: Sequence[_Row]) -> None:
        """Publish these committed rows now; failures stay for the loop."""
        self._unmarked.update(await self._publish(rows))

    async def flush(self, *, up_to_id: int | None = None) -> int:
        """Publish every unpublished row (up to `up_to_id`); returns how many went out."""
        async with self._lock:
            await self.mark_published()
            total = 0
            while True:
                query = select(Outbox).where(col(Outbox.published_at).is_(None))
                if up_to_id is not None:
                    query = query.where(col(Outbox.id) <= up_to_id)
                async with self.db.reader() as session:
                    rows = list((await session.exec(query.order_by(col(Outbox.id)).limit(self.batch))).all())
                if not rows:
                    return total
                done = await self._publish(rows)
                await self._mark(done)
                total += len(done)
                if len(done) < len(rows):
                    return total

    async def _mark(self, done: list[int]) -> None:
        for start in range(0, len(done), 500):
            chunk = done[start : start + 500]
            async with self.db.transaction() as session:
                await session.exec(update(Outbox).where(col(Outbox.id).in_(chunk)).values(published_at=self.clock.now()))

    async def mark_published(self) -> None:
        done, self._unmarked = sorted(self._unmarked), set()
        try:
            await self._mark(done)
        except Exception:
            self._unmarked.update(done)
            raise

    async def _publish(self, rows: Sequence[_Row]) -> list[int]:
        # Peer states of one device go out in order; everything else concurrently.
        groups: dict[object, list[tuple[int, Event]]] = {}
        for row in rows:
            event = getattr(row, "event", None) or ANY_EVENT_ADAPTER.validate_json(row.payload)
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
                        await self.peers.publish_peer_state(event)
                    elif isinstance(event, LoginApproved):
                        await self.sink.notify_login_approved(event)
                    else:
                        await self.sink.publish_event(event)
                except Exception as exc:
                    log.warning("outbox: publishing %s (row %s) failed, will retry: %s", event.type, row_id, exc)
                    return
                done.append(row_id)

        await asyncio.gather(*(publish_group(g) for g in groups.values()))
        return done

    async def retry_round(self) -> int:
        """Publish rows that were already pending in the previous round, so that a row
        gets one round to be published by the transaction that wrote it."""
        await self.mark_published()
        published = await self.flush(up_to_id=self._seen_pending) if self._seen_pending else 0
        async with self.db.reader() as session:
            newest = (
                await session.exec(select(func.max(Outbox.id)).where(col(Outbox.published_at).is_(None)))
            ).one()
        self._seen_pending = newest or 0
        return published

    async def run(self, interval_s: float) -> None:
        """Retry what failed, and purge what was published a day ago."""
        while True:
            await asyncio.sleep(interval_s)
            try:
                await self.retry_round()
                async with self.db.transaction() as session:
                    await session.exec(
                        delete(Outbox).where(col(Outbox.published_at) < self.clock.now() - timedelta(days=1))
                    )
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("outbox relay: %s", exc)
