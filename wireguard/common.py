"""What every adapter shares: key checks and running `ip`."""
from __future__ import annotations

import asyncio
import ipaddress
import socket

from schemas.sealing import SealError, b64decode_key
from wireguard.port import BackendError, PeerConfig, PeerStatus

ZERO_KEY = "A" * 43 + "="  # 32 zero bytes: WireGuard's "no pre-shared key"


def check_key(value: str, what: str) -> bytes:
    try:
        return b64decode_key(value, what=what)
    except SealError as exc:
        raise BackendError(str(exc)) from None


def check_peer(peer: PeerConfig) -> None:
    """Refuse a peer before anything is applied: keys of 32 bytes (a PSK of another length
    would be silently ignored by the kernel), valid networks, a numeric endpoint."""
    check_key(peer.public_key, "public key")
    if peer.preshared_key is not None:
        check_key(peer.preshared_key, "pre-shared key")
    for network in peer.allowed_ips:
        try:
            ipaddress.ip_network(network, strict=False)
        except ValueError:
            raise BackendError(f"allowed IP {network!r} is not a network") from None
    if peer.persistent_keepalive is not None and not 0 <= peer.persistent_keepalive <= 65535:
        raise BackendError("persistent keepalive must be from 0 to 65535 s")


def canonical_networks(networks: tuple[str, ...] | list[str]) -> set[str]:
    return {str(ipaddress.ip_network(n, strict=False)) for n in networks}


def holds(peer: PeerConfig, actual: PeerStatus) -> bool:
    """Whether the interface holds `peer` as asked."""
    return (
        actual.public_key == peer.public_key
        and actual.preshared_key == peer.preshared_key
        and canonical_networks(actual.allowed_ips) == canonical_networks(peer.allowed_ips)
        and (actual.persistent_keepalive or None) == (peer.persistent_keepalive or None)
    )


def read_back(peer: PeerConfig, peers: list[PeerStatus]) -> PeerStatus:
    """The peer as the interface now holds it; raises unless it holds as asked."""
    actual = next((p for p in peers if p.public_key == peer.public_key), None)
    if actual is None or not holds(peer, actual):
        raise BackendError(f"peer {peer.public_key} does not read back as applied")
    return actual


def resolve_endpoint(endpoint: str) -> tuple[str, int]:
    """HOST:PORT (or [v6]:PORT) to a numeric address and port."""
    host, sep, port = endpoint.rpartition(":")
    if not sep or not port.isdigit():
        raise BackendError(f"endpoint {endpoint!r} is not HOST:PORT")
    host = host.strip("[]")
    try:
        address = socket.getaddrinfo(host, int(port), type=socket.SOCK_DGRAM)[0][4][0]
    except OSError as exc:
        raise BackendError(f"cannot resolve endpoint host {host!r}: {exc}") from None
    return address, int(port)


async def run_ip(*args: str, netns: str | None = None, check: bool = True) -> str:
    command = ["ip", *(["-n", netns] if netns else []), *args]
    process = await asyncio.create_subprocess_exec(
        *command, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    out, err = await process.communicate()
    if check and process.returncode != 0:
        raise BackendError(f"`{' '.join(command)}` failed: {err.decode().strip()}")
    return out.decode()


async def enable_forwarding(interface: str, netns: str | None = None) -> None:
    """Let packets that come in through the tunnel be forwarded (to the networks a location
    routes), for this interface only, in its network namespace. The way back (a route to
    the VPN network, or NAT) and forwarding on the LAN side are the operator's: see
    docs/guide.md, *Routed networks*."""
    keys = [f"net.ipv4.conf.{interface}.forwarding=1", f"net.ipv6.conf.{interface}.forwarding=1"]
    for key in keys:
        command = [*(["ip", "netns", "exec", netns] if netns else []), "sysctl", "-q", "-w", key]
        process = await asyncio.create_subprocess_exec(
            *command, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
        )
        _, err = await process.communicate()
        if process.returncode != 0 and key.startswith("net.ipv4"):  # IPv6 may be off: that is fine
            raise BackendError(f"cannot enable forwarding on {interface}: {err.decode().strip()}")


def check_batch(set_peers: list[PeerConfig], remove: list[str]) -> None:
    for peer in set_peers:
        check_peer(peer)
    for public_key in remove:
        check_key(public_key, "public key")


def verify_batch(set_peers: list[PeerConfig], remove: list[str], actual: list[PeerStatus]) -> None:
    """Raise unless every peer in `set_peers` holds and none in `remove` is left."""
    present = {p.public_key: p for p in actual}
    wrong = [p.public_key for p in set_peers if p.public_key not in present or not holds(p, present[p.public_key])]
    left = [key for key in remove if key in present]
    if wrong or left:
        raise BackendError(
            f"{len(wrong)} peers do not read back as applied and {len(left)} were not removed"
            f" (first: {(wrong + left)[0]})"
        )
