"""The exception tree every package shares, so that a caller can tell what kind of failure
it has without knowing which module raised it:

    WgmfaError
    ├── Unavailable   something needed did not answer: retry later, the input may be fine
    ├── Invalid       input or data that can never be accepted: retrying cannot help
    └── Conflict      the state changed under us: read again, then decide

The classes each package raises (BusUnavailable, SealError, ProviderRejected...) keep their
names and derive from one of these. This module imports nothing, so that the contract
(schemas) can use it and still be importable on its own.
"""


class WgmfaError(Exception):
    """Raised by wgmfa code for a failure it knows about; anything else is a bug."""


class Unavailable(WgmfaError):
    """Raised when something needed did not answer: the bus, a WireGuard backend, the OIDC
    provider, the mail server, nats-server. The same request may succeed later."""


class Invalid(WgmfaError, ValueError):
    """Raised for input or data that can never be accepted (a sealed value that does not
    open, a bad signature, an unusable secret key, a provider's refusal). A ValueError too,
    so that callers that check input with `except ValueError` keep catching it."""


class Conflict(WgmfaError):
    """Raised when the state changed under us between reading it and writing it (a
    compare-and-set lost): read the new state and decide again."""
