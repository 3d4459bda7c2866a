"""The `WireGuardBackend` port: everything the gateway needs from a WireGuard interface.

Adapters: userspace wireguard-go through the UAPI socket (`wireguard.userspace`), kernel
WireGuard through pyroute2's generic netlink (`wireguard.kernel`), and an in-memory fake
for tests (`wireguard.testing`). Keys cross this boundary as standard base64 (as `wg` prints them);
adapters convert to what their transport wants (UAPI: lowercase hex).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

from runtime.errors import Unavailable, WgmfaError


class BackendError(WgmfaError):
    """Raised when the interface refused an operation, does not read back as asked, or
    cannot be reached. The message never contains a private or pre-shared key."""


class BackendUnavailable(BackendError, Unavailable):
    """Raised when the backend cannot run here (no kernel module, no wireguard-go, not
    root...)."""


@dataclass(frozen=True)
class InterfaceConfig:
    name: str
    private_key: str
    listen_port: int
    address: str  # CIDR, e.g. 10.10.0.1/24
    netns: str | None = None  # network namespace to create the interface in


@dataclass(frozen=True)
class PeerConfig:
    """The desired state of one peer."""

    public_key: str
    preshared_key: str | None
    allowed_ips: tuple[str, ...]
    persistent_keepalive: int | None = None
    endpoint: str | None = None  # HOST:PORT; clients set the server's, gateways leave it to roaming


@dataclass(frozen=True)
class PeerStatus:
    """One peer as the interface reports it."""

    public_key: str
    preshared_key: str | None  # None when unset (all zero)
    allowed_ips: tuple[str, ...]
    persistent_keepalive: int | None
    endpoint: str | None
    latest_handshake: int  # Unix seconds on the gateway's clock; 0 = never
    rx_bytes: int
    tx_bytes: int

    def config(self) -> PeerConfig:
        return PeerConfig(self.public_key, self.preshared_key, self.allowed_ips, self.persistent_keepalive)


@dataclass
class InterfaceStatus:
    name: str
    public_key: str
    listen_port: int
    peers: list[PeerStatus] = field(default_factory=list)


class WireGuardBackend(Protocol):
    async def ensure_interface(self, config: InterfaceConfig) -> None:
        """Create the interface if missing; set its private key, port and address; bring it
        up. Existing peers stay untouched."""

    async def status(self) -> InterfaceStatus:
        """The interface and every peer, with handshake times and counters."""

    async def set_peer(self, peer: PeerConfig) -> PeerStatus:
        """Add or update one peer (allowed IPs replaced, PSK set or cleared). Validates the
        PSK as 32 bytes before applying and reads the peer back; raises BackendError when
        the interface does not hold what was asked."""

    async def remove_peer(self, public_key: str) -> None:
        """Remove the peer; removing an absent peer is not an error."""

    async def apply(self, set_peers: list[PeerConfig], remove: list[str]) -> None:
        """A batch (a resync): validate everything first, apply it, then read the interface
        back once; raises BackendError when any peer does not hold as asked."""

    async def remove_interface(self) -> None:
        """Take the interface (and every peer on it) away."""

    async def close(self) -> None:
        """Release what this adapter holds. The interface stays, with its peers, so that a
        restarted gateway does not interrupt anyone."""
