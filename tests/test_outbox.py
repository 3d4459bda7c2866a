"""Publish after commit: a failed publish is retried, in order per device, never lost."""
from __future__ import annotations

from pathlib import Path

from sqlmodel import select

from core_service.db import Database
from core_service.models import Outbox
from core_service.outbox import OutboxRelay, enqueue_event, enqueue_peer_state, pending_rows
from runtime.testing import FakeClock
from schemas.common import utcnow
from schemas.events import Event, PeerAuthorized, UserCreated


class FlakySink:
    def __init__(self, failures: int) -> None:
        self.failures = failures
        self.published: list[Event] = []

    async def _maybe_fail(self) -> None:
        if self.failures > 0:
            self.failures -= 1
            raise ConnectionError("NATS is down")

    async def publish_peer_state(self, state: PeerAuthorized) -> bool:  # type: ignore[override]
        await self._maybe_fail()
        self.published.append(state)
        return True

    async def publish_event(self, event: Event) -> None:
        await self._maybe_fail()
        self.published.append(event)


def authorize(generation: int) -> PeerAuthorized:
    return PeerAuthorized(location_id=1, device_id=1, generation=generation, pubkey="k", allowed_ips=[], keepalive_s=25,
                          authorized_at=utcnow())


async def unpublished(db: Database) -> int:
    async with db.reader() as session:
        return len((await session.exec(select(Outbox).where(Outbox.published_at == None))).all())  # noqa: E711


async def test_a_failed_publish_is_retried_in_order_a_round_later(tmp_path: Path) -> None:
    db = Database(f"sqlite+aiosqlite:///{tmp_path / 'core.db'}")
    await db.migrate()
    sink = FlakySink(failures=1)
    relay = OutboxRelay(db, sink, sink, FakeClock())
    async with db.transaction() as session:
        enqueue_peer_state(session, authorize(1))
        enqueue_peer_state(session, authorize(2))
        enqueue_event(session, UserCreated(user_id=1, username="a"))
        rows = pending_rows(session)
    await relay.publish(rows)
    # the first peer state failed, so the second of the same device waited; the event went out
    assert [e.type for e in sink.published] == ["admin.user_created"]

    assert await relay.retry_round() == 0  # a row gets one round before the loop retries it
    assert await unpublished(db) == 2
    assert await relay.retry_round() == 2
    assert [e.generation for e in sink.published[1:]] == [1, 2]  # type: ignore[attr-defined]
    assert await unpublished(db) == 0
    await db.close()
