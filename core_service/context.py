from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass

from sqlmodel.ext.asyncio.session import AsyncSession

from core_service.db import Database
from core_service.keys import Vault
from core_service.outbox import OutboxRelay, pending_rows
from core_service.settings import CoreSettings
from runtime.clock import Clock


@dataclass
class CoreContext:
    """What the domain functions work with; no NATS, no HTTP."""

    settings: CoreSettings
    db: Database
    vault: Vault
    clock: Clock
    relay: OutboxRelay

    @contextlib.asynccontextmanager
    async def transaction(self) -> AsyncIterator[AsyncSession]:
        """A database transaction whose outbox rows are published right after it commits."""
        async with self.db.transaction() as session:
            yield session
            rows = pending_rows(session)
        if rows:
            # Publish before answering, but do not hold the answer long: a publish that is
            # slow (JetStream electing a leader) goes on in the background and the relay
            # retries whatever it could not finish.
            publishing = asyncio.ensure_future(self.relay.publish(rows))
            await asyncio.wait([publishing], timeout=self.settings.publish_wait_s)
