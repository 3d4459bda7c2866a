"""Kernel WireGuard through pyroute2's generic netlink (needs the wireguard module)."""
from __future__ import annotations

import errno

from pyroute2 import AsyncIPRoute, AsyncWireGuard
from pyroute2.netlink.exceptions import NetlinkError

from wireguard.port import (
    BackendError,
    BackendUnavailable,
    InterfaceConfig,
    InterfaceStatus,
    PeerConfig,
    PeerStatus,
)
from wireguard.common import (
    enable_forwarding,
    ZERO_KEY,
    check_batch,
    check_key,
    check_peer,
    read_back,
    resolve_endpoint,
    run_ip,
    verify_batch,
)

UNAVAILABLE = "kernel WireGuard is not available: the wireguard module is not loaded (use --backend userspace)"


def _text(value: object) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


class KernelBackend:
    def __init__(self) -> None:
        self.config: InterfaceConfig | None = None

    async def _wg(self) -> AsyncWireGuard:
        assert self.config is not None
        wg = AsyncWireGuard(netns=self.config.netns) if self.config.netns else AsyncWireGuard()
        try:
            await wg.setup_endpoint()
        except NetlinkError as exc:
            wg.close()
            raise BackendUnavailable(UNAVAILABLE) from exc
        return wg

    async def ensure_interface(self, config: InterfaceConfig) -> None:
        check_key(config.private_key, "private key")
        self.config = config
        ipr = AsyncIPRoute(netns=config.netns) if config.netns else AsyncIPRoute()
        try:
            await ipr.setup_endpoint()
            if not await ipr.link_lookup(ifname=config.name):
                try:
                    await ipr.link("add", ifname=config.name, kind="wireguard")
                except NetlinkError as exc:
                    if exc.code in (errno.EOPNOTSUPP, errno.ENOENT, errno.EINVAL):
                        raise BackendUnavailable(UNAVAILABLE) from exc
                    raise BackendError(f"cannot create {config.name}: {exc}") from exc
        finally:
            ipr.close()
        wg = await self._wg()
        try:
            await wg.set(config.name, private_key=config.private_key, listen_port=config.listen_port)
        except NetlinkError as exc:
            raise BackendError(f"cannot configure {config.name}: {exc}") from exc
        finally:
            wg.close()
        await run_ip("address", "replace", config.address, "dev", config.name, netns=config.netns)
        await run_ip("link", "set", config.name, "up", netns=config.netns)
        await enable_forwarding(config.name, config.netns)

    async def status(self) -> InterfaceStatus:
        if self.config is None:
            raise BackendError("no interface yet: call ensure_interface first")
        wg = await self._wg()
        try:
            messages = await wg.info(self.config.name)
        except NetlinkError as exc:
            raise BackendError(f"cannot read {self.config.name}: {exc}") from exc
        finally:
            wg.close()
        status = InterfaceStatus(name=self.config.name, public_key="", listen_port=0)
        for message in messages:
            if message.get_attr("WGDEVICE_A_PUBLIC_KEY"):
                status.public_key = _text(message.get_attr("WGDEVICE_A_PUBLIC_KEY"))
            status.listen_port = message.get_attr("WGDEVICE_A_LISTEN_PORT") or status.listen_port
            for peer in message.get_attr("WGDEVICE_A_PEERS") or []:
                psk = _text(peer.get_attr("WGPEER_A_PRESHARED_KEY") or ZERO_KEY)
                handshake = peer.get_attr("WGPEER_A_LAST_HANDSHAKE_TIME") or {}
                endpoint = peer.get_attr("WGPEER_A_ENDPOINT")
                status.peers.append(
                    PeerStatus(
                        public_key=_text(peer.get_attr("WGPEER_A_PUBLIC_KEY")),
                        preshared_key=None if psk == ZERO_KEY else psk,
                        allowed_ips=tuple(ip["addr"] for ip in peer.get_attr("WGPEER_A_ALLOWEDIPS") or [] if "addr" in ip),
                        persistent_keepalive=peer.get_attr("WGPEER_A_PERSISTENT_KEEPALIVE_INTERVAL") or None,
                        endpoint=f"{endpoint['addr']}:{endpoint['port']}" if endpoint else None,
                        latest_handshake=int(handshake.get("tv_sec", 0)),
                        rx_bytes=peer.get_attr("WGPEER_A_RX_BYTES") or 0,
                        tx_bytes=peer.get_attr("WGPEER_A_TX_BYTES") or 0,
                    )
                )
        return status

    @staticmethod
    def _request(peer: PeerConfig) -> dict:
        request: dict = {
            "public_key": peer.public_key,
            "preshared_key": peer.preshared_key or ZERO_KEY,
            "persistent_keepalive": peer.persistent_keepalive or 0,
            "replace_allowed_ips": True,
            "allowed_ips": list(peer.allowed_ips),
        }
        if peer.endpoint:
            request["endpoint_addr"], request["endpoint_port"] = resolve_endpoint(peer.endpoint)
        return request

    async def _send(self, requests: list[dict]) -> None:
        assert self.config is not None
        wg = await self._wg()
        try:
            for request in requests:
                try:
                    await wg.set(self.config.name, peer=request)
                except (NetlinkError, ValueError) as exc:
                    raise BackendError(f"cannot change peer {request['public_key']}: {exc}") from exc
        finally:
            wg.close()

    async def set_peer(self, peer: PeerConfig) -> PeerStatus:
        check_peer(peer)  # the kernel silently ignores a PSK that is not 32 bytes
        await self._send([self._request(peer)])
        return read_back(peer, (await self.status()).peers)

    async def remove_peer(self, public_key: str) -> None:
        check_key(public_key, "public key")
        assert self.config is not None
        if not any(p.public_key == public_key for p in (await self.status()).peers):
            return
        wg = await self._wg()
        try:
            await wg.set(self.config.name, peer={"public_key": public_key, "remove": True})
        except NetlinkError as exc:
            raise BackendError(f"cannot remove peer {public_key}: {exc}") from exc
        finally:
            wg.close()

    async def apply(self, set_peers: list[PeerConfig], remove: list[str]) -> None:
        check_batch(set_peers, remove)
        requests = [self._request(peer) for peer in set_peers]
        requests += [{"public_key": key, "remove": True} for key in remove]
        if requests:
            await self._send(requests)
            verify_batch(set_peers, remove, (await self.status()).peers)

    async def remove_interface(self) -> None:
        if self.config is not None:
            await run_ip("link", "delete", self.config.name, netns=self.config.netns, check=False)

    async def close(self) -> None:
        pass
