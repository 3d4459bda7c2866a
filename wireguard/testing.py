"""An in-memory WireGuard interface for fast tests, with the real adapters' rules. Product code
imports it only where WGMFA_BACKEND=fake chooses it (`wireguard.create_backend`)."""
from __future__ import annotations

from collections import Counter
from dataclasses import replace

from schemas.sealing import public_key_of
from wireguard.port import BackendError, InterfaceConfig, InterfaceStatus, PeerConfig, PeerStatus
from wireguard.common import check_batch, check_key, check_peer


class FakeBackend:
    def __init__(self) -> None:
        self.config: InterfaceConfig | None = None
        self.peers: dict[str, PeerStatus] = {}
        self.sets: Counter[str] = Counter()  # set_peer calls per public key
        self.removes: Counter[str] = Counter()
        self.fail_next = 0  # make this many operations fail
        self.lost = False  # as if wireguard-go died: every call fails until ensure_interface

    def _operation(self) -> None:
        if self.lost:
            raise BackendError("UAPI socket is gone")
        if self.fail_next > 0:
            self.fail_next -= 1
            raise BackendError("injected failure")

    async def ensure_interface(self, config: InterfaceConfig) -> None:
        check_key(config.private_key, "private key")
        if self.lost:
            self.peers.clear()  # a recreated interface starts empty
            self.lost = False
        self._operation()
        self.config = config

    async def status(self) -> InterfaceStatus:
        self._operation()
        assert self.config is not None
        return InterfaceStatus(
            name=self.config.name,
            public_key=public_key_of(self.config.private_key),
            listen_port=self.config.listen_port,
            peers=list(self.peers.values()),
        )

    async def set_peer(self, peer: PeerConfig) -> PeerStatus:
        check_peer(peer)
        self._operation()
        current = self.peers.get(peer.public_key)
        updated = PeerStatus(
            public_key=peer.public_key,
            preshared_key=peer.preshared_key,
            allowed_ips=tuple(peer.allowed_ips),
            persistent_keepalive=peer.persistent_keepalive or None,
            endpoint=peer.endpoint or (current.endpoint if current else None),
            latest_handshake=current.latest_handshake if current else 0,
            rx_bytes=current.rx_bytes if current else 0,
            tx_bytes=current.tx_bytes if current else 0,
        )
        self.peers[peer.public_key] = updated
        self.sets[peer.public_key] += 1
        return updated

    async def remove_peer(self, public_key: str) -> None:
        check_key(public_key, "public key")
        self._operation()
        if self.peers.pop(public_key, None) is not None:
            self.removes[public_key] += 1

    async def apply(self, set_peers: list[PeerConfig], remove: list[str]) -> None:
        check_batch(set_peers, remove)
        self._operation()
        for peer in set_peers:
            await self.set_peer(peer)
        for public_key in remove:
            await self.remove_peer(public_key)

    async def remove_interface(self) -> None:
        self.peers.clear()
        self.config = None

    async def close(self) -> None:
        pass

    # --- test hooks ------------------------------------------------------------------------

    def handshake(self, public_key: str, at: int, *, rx: int = 0, tx: int = 0) -> None:
        """As if the peer had handshaken at Unix time `at`, moving rx/tx bytes."""
        peer = self.peers[public_key]
        self.peers[public_key] = replace(peer, latest_handshake=at, rx_bytes=peer.rx_bytes + rx, tx_bytes=peer.tx_bytes + tx)
