"""Fakes of the core's ports for fast tests; product code never imports this module."""
from __future__ import annotations

from dataclasses import dataclass, field

from core_service.mailer import MailError


@dataclass
class FakeMailer:
    """Keeps what it is asked to send; `down` makes every send fail as an unreachable
    server would."""

    sent: list[tuple[str, str, str]] = field(default_factory=list)
    down: bool = False

    async def send(self, to: str, subject: str, body: str) -> None:
        if self.down:
            raise MailError("connection refused")
        self.sent.append((to, subject, body))
