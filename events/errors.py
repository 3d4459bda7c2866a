"""The bus's failures, in the product's exception tree (runtime.errors)."""
from __future__ import annotations

from runtime.errors import Invalid, Unavailable


class BusUnavailable(Unavailable):
    """NATS, or the service behind a subject, did not answer: retry later."""


class PermanentFailure(Invalid):
    """Raised by a consumer's handler for a message that can never be processed: it is
    dead-lettered at once instead of redelivered."""
