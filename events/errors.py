"""The bus's failures."""
from __future__ import annotations


class BusUnavailable(Exception):
    """The bus or the service behind a subject did not answer."""


class PermanentFailure(Exception):
    """Raised by a consumer's handler for a message that can never be processed: it is
    dead-lettered at once instead of redelivered."""
