"""The WireGuard port (`wireguard.port`), its adapters, and the factory that picks one.

The gateway applies peers through it and the CLI's reference client brings its tunnel up
through it; neither process imports the other's package for this."""
from __future__ import annotations

from wireguard.port import BackendUnavailable, WireGuardBackend


def create_backend(kind: str) -> WireGuardBackend:
    if kind == "userspace":
        from wireguard.userspace import UserspaceBackend

        return UserspaceBackend()
    if kind == "kernel":
        from wireguard.kernel import KernelBackend

        return KernelBackend()
    if kind == "fake":  # only WGMFA_BACKEND=fake chooses it (--backend does not offer it): peers kept in memory
        from wireguard.testing import FakeBackend

        return FakeBackend()
    raise BackendUnavailable(f"unknown WireGuard backend {kind!r}: use userspace or kernel")
