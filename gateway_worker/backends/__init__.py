"""The adapters of the WireGuardBackend port, and the factory that picks one."""
from __future__ import annotations

from gateway_worker.backend import BackendUnavailable, WireGuardBackend


def create_backend(kind: str) -> WireGuardBackend:
    if kind == "userspace":
        from gateway_worker.backends.uapi import UserspaceBackend

        return UserspaceBackend()
    if kind == "kernel":
        from gateway_worker.backends.kernel import KernelBackend

        return KernelBackend()
    if kind == "fake":
        from gateway_worker.backends.fake import FakeBackend

        return FakeBackend()
    raise BackendUnavailable(f"unknown WireGuard backend {kind!r}: use userspace or kernel")
