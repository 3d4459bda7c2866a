from __future__ import annotations

from dataclasses import dataclass

from core_service.db import Database
from core_service.keys import Vault
from core_service.outbox import OutboxRelay
from core_service.settings import CoreSettings
from events.clock import Clock


@dataclass
class CoreContext:
    """What the domain functions work with; no NATS, no HTTP."""

    settings: CoreSettings
    db: Database
    vault: Vault
    clock: Clock
    relay: OutboxRelay
