from __future__ import annotations

import re
import socket
from pathlib import Path

from pydantic import Field

from runtime.settings import LivenessSettings


def default_gateway_id() -> str:
    return re.sub(r"[^A-Za-z0-9_-]", "-", socket.gethostname())[:32] or "gateway"


class GatewaySettings(LivenessSettings):
    credentials: Path | None = None
    """The location's gateway credentials file (`wgmfa admin gateway add` writes one)."""
    gateway_id: str | None = None
    """This gateway's name in stats subjects and consumer names (default: the host name)."""
    interface: str | None = None
    """WireGuard interface name (default wgmfa<location id>)."""
    backend: str = "userspace"
    """userspace (wireguard-go through its UAPI socket) or kernel (netlink)."""
    netns: str | None = None
    """Network namespace to put the interface in."""
    gateway_metrics_port: int | None = Field(None, ge=1, le=65535)
    """Serve the gateway's Prometheus /metrics on this port (on metrics_host); none by default."""
    remove_interface_on_exit: bool = False
    """Take the interface down when the gateway stops (by default it stays, with its peers,
    so that a restart does not interrupt anyone)."""
