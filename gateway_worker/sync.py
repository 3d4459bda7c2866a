"""Diffing an interface against the desired peer set: add what is missing, remove what is
extra, fix what differs, and leave correct peers alone (so their sessions live on)."""
from __future__ import annotations

from dataclasses import dataclass, field

from wireguard.port import PeerConfig, PeerStatus


@dataclass
class Plan:
    add: list[PeerConfig] = field(default_factory=list)
    update: list[PeerConfig] = field(default_factory=list)
    remove: list[str] = field(default_factory=list)
    unchanged: list[str] = field(default_factory=list)


def same_peer(desired: PeerConfig, actual: PeerStatus) -> bool:
    return (
        desired.preshared_key == actual.preshared_key
        and set(desired.allowed_ips) == set(actual.allowed_ips)
        and (desired.persistent_keepalive or None) == (actual.persistent_keepalive or None)
    )


def plan(desired: dict[str, PeerConfig], actual: list[PeerStatus]) -> Plan:
    result = Plan()
    present = {peer.public_key: peer for peer in actual}
    for public_key, peer in desired.items():
        current = present.get(public_key)
        if current is None:
            result.add.append(peer)
        elif same_peer(peer, current):
            result.unchanged.append(public_key)
        else:
            result.update.append(peer)
    result.remove = [key for key in present if key not in desired]
    return result
