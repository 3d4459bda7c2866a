"""Network namespaces joined by veth pairs, for tests with real WireGuard (root only).

A Topology is one gateway namespace and any number of client namespaces on one underlay
network, 172.31.0.0/24: the gateway namespace holds a bridge at 172.31.0.1, and each
client joins it with a veth pair (client n at 172.31.0.<n+1>).
Names are random, so that parallel or leftover runs never collide; close() removes every
namespace (and with them the veth pairs and anything inside).
"""
from __future__ import annotations

import secrets
import subprocess
from dataclasses import dataclass, field


class NetnsError(RuntimeError):
    pass


def sh(*command: str, check: bool = True, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(list(command), capture_output=True, text=True, timeout=timeout)
    if check and result.returncode != 0:
        raise NetnsError(f"{' '.join(command)}: {result.stderr.strip() or result.stdout.strip()}")
    return result


GATEWAY_ADDRESS = "172.31.0.1"


@dataclass
class Client:
    netns: str
    index: int
    address: str  # its underlay address


@dataclass
class Topology:
    tag: str = field(default_factory=lambda: secrets.token_hex(3))
    gateway: str = ""
    clients: list[Client] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.gateway = f"wgt{self.tag}g"
        sh("ip", "netns", "add", self.gateway)
        self.run(self.gateway, "ip", "link", "set", "lo", "up")
        self.bridge = f"br{self.tag}"
        self.run(self.gateway, "ip", "link", "add", self.bridge, "type", "bridge")
        self.run(self.gateway, "ip", "address", "add", f"{GATEWAY_ADDRESS}/24", "dev", self.bridge)
        self.run(self.gateway, "ip", "link", "set", self.bridge, "up")

    def name(self, role: str) -> str:
        """An interface name unique on the machine (UAPI sockets are not per namespace)."""
        name = f"wt{self.tag}{role}"
        assert len(name) <= 15, name
        return name

    def add_client(self) -> Client:
        index = len(self.clients) + 1
        netns = f"wgt{self.tag}c{index}"
        sh("ip", "netns", "add", netns)
        self.run(netns, "ip", "link", "set", "lo", "up")
        outer, inner = f"vg{self.tag}{index}", f"vc{self.tag}{index}"
        sh("ip", "link", "add", outer, "type", "veth", "peer", "name", inner)
        sh("ip", "link", "set", outer, "netns", self.gateway)
        sh("ip", "link", "set", inner, "netns", netns)
        client_address = f"172.31.0.{index + 1}"
        self.run(self.gateway, "ip", "link", "set", outer, "master", self.bridge)
        self.run(self.gateway, "ip", "link", "set", outer, "up")
        self.run(netns, "ip", "address", "add", f"{client_address}/24", "dev", inner)
        self.run(netns, "ip", "link", "set", inner, "up")
        client = Client(netns=netns, index=index, address=client_address)
        self.clients.append(client)
        return client

    def run(self, netns: str, *command: str, check: bool = True, timeout: float = 30) -> subprocess.CompletedProcess[str]:
        return sh("ip", "netns", "exec", netns, *command, check=check, timeout=timeout)

    def ping(self, netns: str, address: str, *, count: int = 1, wait_s: float = 1) -> bool:
        result = self.run(netns, "ping", "-n", "-q", "-c", str(count), "-W", str(wait_s), address, check=False)
        return result.returncode == 0

    def set_link(self, client: Client, up: bool) -> None:
        """Cut (or restore) a client's only link: it goes silent without knowing."""
        self.run(client.netns, "ip", "link", "set", f"vc{self.tag}{client.index}", "up" if up else "down")

    def close(self) -> None:
        for netns in [c.netns for c in self.clients] + [self.gateway]:
            # wireguard-go processes inside go with their interfaces
            for link in self.run(netns, "ip", "-o", "link", "show", check=False).stdout.splitlines():
                name = link.split(":")[1].strip().split("@")[0]
                if name.startswith("wt"):
                    self.run(netns, "ip", "link", "delete", name, check=False)
            for pid in sh("ip", "netns", "pids", netns, check=False).stdout.split():
                sh("kill", "-9", pid, check=False)
            sh("ip", "netns", "delete", netns, check=False)

    def __enter__(self) -> "Topology":
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()
