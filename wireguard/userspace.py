"""Userspace WireGuard (wireguard-go) through its UAPI socket.

The socket is /var/run/wireguard/<interface>.sock on the shared filesystem (not per
network namespace, so interface names must be unique on the machine). Keys are hex on
this protocol. wireguard-go is started detached, so that the interface and its sessions
outlive the process that asked for it, as a kernel interface would.
"""
from __future__ import annotations

import asyncio
import base64
import os
import shutil
import subprocess
import time
from pathlib import Path

from wireguard.port import (
    BackendError,
    BackendUnavailable,
    InterfaceConfig,
    InterfaceStatus,
    PeerConfig,
    PeerStatus,
)
from schemas.sealing import public_key_of
from wireguard.common import enable_forwarding, check_batch, check_key, check_peer, read_back, resolve_endpoint, run_ip, verify_batch

SOCKET_DIR = Path("/var/run/wireguard")
BATCH = 1000  # peers per UAPI set request
READ_LIMIT = 256 * 1024 * 1024  # a get of 65 536 peers is some tens of MiB
ZERO_HEX = "0" * 64


def to_hex(key: str) -> str:
    return base64.b64decode(key).hex()


def from_hex(value: str) -> str:
    return base64.b64encode(bytes.fromhex(value)).decode()


class UserspaceBackend:
    def __init__(self, *, socket_dir: Path = SOCKET_DIR, start_timeout_s: float = 10.0) -> None:
        self.socket_dir = socket_dir
        self.start_timeout_s = start_timeout_s
        self.config: InterfaceConfig | None = None
        self._process: subprocess.Popen[bytes] | None = None  # the wireguard-go this adapter started

    # --- the UAPI protocol -------------------------------------------------------------------

    @property
    def socket_path(self) -> Path:
        if self.config is None:
            raise BackendError("no interface yet: call ensure_interface first")
        return self.socket_dir / f"{self.config.name}.sock"

    async def _request(self, request: str) -> list[tuple[str, str]]:
        path = self.socket_path
        try:
            reader, writer = await asyncio.open_unix_connection(str(path), limit=READ_LIMIT)
        except OSError as exc:
            raise BackendError(f"UAPI socket {path} is gone ({exc.strerror or exc}): is wireguard-go running?") from None
        try:
            writer.write(request.encode())
            await writer.drain()
            raw = await asyncio.wait_for(reader.readuntil(b"\n\n"), timeout=30)
        except asyncio.TimeoutError:
            raise BackendError(f"UAPI socket {path} did not answer") from None
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, OSError) as exc:
            raise BackendError(f"UAPI socket {path} broke off its reply: {exc}") from None
        finally:
            writer.close()
        lines = [line.partition("=")[::2] for line in raw.decode().split("\n") if line]
        errno = next((int(v) for k, v in reversed(lines) if k == "errno"), None)
        if errno is None:
            raise BackendError(f"UAPI reply on {path} without errno")
        if errno != 0:
            operation = request.split("\n", 1)[0]
            raise BackendError(f"wireguard-go refused {operation}: errno {errno}")
        return lines

    async def _set(self, lines: list[str]) -> None:
        await self._request("set=1\n" + "".join(f"{line}\n" for line in lines) + "\n")

    # --- the interface -----------------------------------------------------------------------

    async def _alive(self) -> bool:
        try:
            await self._request("get=1\n\n")
            return True
        except BackendError:
            return False

    async def ensure_interface(self, config: InterfaceConfig) -> None:
        check_key(config.private_key, "private key")
        self.config = config
        if not await self._alive():
            await self._start_wireguard_go(config)
        await self._set([f"private_key={to_hex(config.private_key)}", f"listen_port={config.listen_port}"])
        await run_ip("address", "replace", config.address, "dev", config.name, netns=config.netns)
        await run_ip("link", "set", config.name, "up", netns=config.netns)
        await enable_forwarding(config.name, config.netns)

    @staticmethod
    def wireguard_go() -> str:
        """The wireguard-go binary, if this machine can run an interface at all."""
        binary = shutil.which("wireguard-go") or ("/usr/bin/wireguard-go" if os.path.exists("/usr/bin/wireguard-go") else None)
        if binary is None:
            raise BackendUnavailable("wireguard-go not found: install Debian's wireguard-go (scripts/install.sh does)")
        if os.geteuid() != 0:
            raise BackendUnavailable("userspace WireGuard needs root (CAP_NET_ADMIN and /dev/net/tun)")
        if not os.path.exists("/dev/net/tun"):
            raise BackendUnavailable("userspace WireGuard needs /dev/net/tun")
        return binary

    async def socket_of_another_namespace(self, name: str, netns: str | None) -> bool:
        """Whether /var/run/wireguard/<name>.sock serves an interface that is not in
        `netns` (the socket directory is one for every namespace)."""
        if not (self.socket_dir / f"{name}.sock").exists():
            return False
        return not (await run_ip("link", "show", name, netns=netns, check=False)).strip()

    async def _start_wireguard_go(self, config: InterfaceConfig) -> None:
        binary = self.wireguard_go()
        stale = self.socket_dir / f"{config.name}.sock"
        if stale.exists():
            stale.unlink()  # left by a wireguard-go that died
        self.socket_dir.mkdir(parents=True, exist_ok=True)
        log_path = self.socket_dir / f"{config.name}.log"
        command = [binary, "-f", config.name]
        if config.netns:
            command = ["ip", "netns", "exec", config.netns, *command]
        self._reap()
        with open(log_path, "ab") as log:
            process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
        self._process = process
        deadline = time.monotonic() + self.start_timeout_s
        while time.monotonic() < deadline:
            if process.poll() is not None:
                output = log_path.read_text(errors="replace")[-1000:]
                raise BackendError(f"wireguard-go for {config.name} exited with {process.returncode}: {output}")
            if stale.exists() and await self._alive():
                return
            await asyncio.sleep(0.05)
        process.kill()
        raise BackendError(f"wireguard-go for {config.name} did not open its UAPI socket in time")

    async def remove_interface(self) -> None:
        if self.config is None:
            return
        await run_ip("link", "delete", self.config.name, netns=self.config.netns, check=False)
        deadline = time.monotonic() + 5
        while self.socket_path.exists() and time.monotonic() < deadline:
            await asyncio.sleep(0.05)  # wireguard-go exits when its TUN device goes
        (self.socket_dir / f"{self.config.name}.log").unlink(missing_ok=True)
        self._reap()

    def _reap(self) -> None:
        """Collect a wireguard-go this adapter started that has exited (no zombies)."""
        if self._process is not None and self._process.poll() is not None:
            self._process = None

    async def close(self) -> None:
        pass  # the interface, and wireguard-go with it, stays

    # --- peers -------------------------------------------------------------------------------

    async def status(self) -> InterfaceStatus:
        lines = await self._request("get=1\n\n")
        assert self.config is not None
        status = InterfaceStatus(name=self.config.name, public_key="", listen_port=0)
        peer: dict | None = None

        def finish() -> None:
            if peer is not None:
                psk = peer.get("psk")
                status.peers.append(
                    PeerStatus(
                        public_key=peer["public_key"],
                        preshared_key=None if psk in (None, ZERO_HEX) else from_hex(psk),
                        allowed_ips=tuple(peer["allowed_ips"]),
                        persistent_keepalive=peer.get("keepalive") or None,
                        endpoint=peer.get("endpoint"),
                        latest_handshake=peer.get("handshake", 0),
                        rx_bytes=peer.get("rx", 0),
                        tx_bytes=peer.get("tx", 0),
                    )
                )

        for key, value in lines:
            if key == "public_key":
                finish()
                peer = {"public_key": from_hex(value), "allowed_ips": []}
            elif peer is None:
                if key == "private_key":
                    status.public_key = public_key_of(from_hex(value))
                elif key == "listen_port":
                    status.listen_port = int(value)
            elif key == "preshared_key":
                peer["psk"] = value
            elif key == "allowed_ip":
                peer["allowed_ips"].append(value)
            elif key == "last_handshake_time_sec":
                peer["handshake"] = int(value)
            elif key == "rx_bytes":
                peer["rx"] = int(value)
            elif key == "tx_bytes":
                peer["tx"] = int(value)
            elif key == "persistent_keepalive_interval":
                peer["keepalive"] = int(value)
            elif key == "endpoint":
                peer["endpoint"] = value
        finish()
        return status

    @staticmethod
    def _peer_lines(peer: PeerConfig) -> list[str]:
        lines = [
            f"public_key={to_hex(peer.public_key)}",
            f"preshared_key={to_hex(peer.preshared_key) if peer.preshared_key else ZERO_HEX}",
            f"persistent_keepalive_interval={peer.persistent_keepalive or 0}",
            "replace_allowed_ips=true",
            *(f"allowed_ip={network}" for network in peer.allowed_ips),
        ]
        if peer.endpoint:
            address, port = resolve_endpoint(peer.endpoint)
            lines.append(f"endpoint={'[' + address + ']' if ':' in address else address}:{port}")
        return lines

    async def set_peer(self, peer: PeerConfig) -> PeerStatus:
        check_peer(peer)
        await self._set(self._peer_lines(peer))
        return read_back(peer, (await self.status()).peers)

    async def remove_peer(self, public_key: str) -> None:
        check_key(public_key, "public key")
        # update_only: an absent peer is not created just to be removed
        await self._set([f"public_key={to_hex(public_key)}", "update_only=true", "remove=true"])

    async def apply(self, set_peers: list[PeerConfig], remove: list[str]) -> None:
        check_batch(set_peers, remove)
        blocks = [self._peer_lines(peer) for peer in set_peers]
        blocks += [[f"public_key={to_hex(key)}", "remove=true"] for key in remove]
        for start in range(0, len(blocks), BATCH):
            await self._set([line for block in blocks[start : start + BATCH] for line in block])
        if blocks:
            verify_batch(set_peers, remove, (await self.status()).peers)

