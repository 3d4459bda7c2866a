"""Calls to the core over NATS, with every secret sealed in both directions."""
from __future__ import annotations

import asyncio
import time

from events import subjects
from events.bus import Bus, BusUnavailable
from schemas.sealing import ReplyKey, seal
from schemas import rpc

HELLO_TTL_S = 60.0


class CoreClient:
    def __init__(self, bus_ready: "BusHolder", timeout_s: float) -> None:
        self._holder = bus_ready
        self.timeout_s = timeout_s
        self.reply_key = ReplyKey()
        self._core_key: str | None = None
        self._core_key_at = 0.0
        self._lock = asyncio.Lock()

    @property
    def bus(self) -> Bus:
        bus = self._holder.bus
        if bus is None or not bus.connected:
            raise BusUnavailable("not connected to NATS")
        return bus

    async def core_key(self) -> str:
        """The core's RPC public key, cached for a minute."""
        async with self._lock:
            if self._core_key is None or time.monotonic() - self._core_key_at > HELLO_TTL_S:
                hello = await self.bus.call(
                    subjects.RPC_CORE_HELLO, rpc.CoreHello(), rpc.CoreHelloResult, timeout=self.timeout_s
                )
                self._core_key, self._core_key_at = hello.rpc_public_key, time.monotonic()
            return self._core_key

    async def start(self, location_id: int, pubkey: str, method: int, client: rpc.ClientInfo) -> tuple[str, str | None]:
        request = rpc.MfaStartRequest(
            location_id=location_id, pubkey=pubkey, method=method, client=client, reply_key=self.reply_key.public
        )
        result = await self.bus.call(subjects.RPC_MFA_START, request, rpc.MfaStartResult, timeout=self.timeout_s)
        return self.reply_key.open(result.token_sealed), result.challenge

    async def finish(
        self, token: str, code: str | None, auth_pub_key: str | None, client: rpc.ClientInfo
    ) -> tuple[str, str | None]:
        key = await self.core_key()
        request = rpc.MfaFinishRequest(
            token_sealed=seal(key, token),
            code_sealed=seal(key, code) if code is not None else None,
            auth_pub_key=auth_pub_key,
            client=client,
            reply_key=self.reply_key.public,
        )
        result = await self.bus.call(subjects.RPC_MFA_FINISH, request, rpc.MfaFinishResult, timeout=self.timeout_s)
        echoed = self.reply_key.open(result.token_sealed) if result.token_sealed else None
        return self.reply_key.open(result.psk_sealed), echoed

    async def finish_remote(self, token: str, signature: str | None, auth_pub_key: str | None, client: rpc.ClientInfo) -> None:
        key = await self.core_key()
        request = rpc.MfaFinishRemoteRequest(
            token_sealed=seal(key, token),
            code_sealed=seal(key, signature) if signature is not None else None,
            auth_pub_key=auth_pub_key,
            client=client,
        )
        await self.bus.call(subjects.RPC_MFA_FINISH_REMOTE, request, rpc.Empty, timeout=self.timeout_s)

    async def token_status(self, token: str) -> rpc.TokenStatusResult:
        key = await self.core_key()
        request = rpc.TokenStatusRequest(token_sealed=seal(key, token))
        return await self.bus.call(subjects.RPC_MFA_TOKEN_STATUS, request, rpc.TokenStatusResult, timeout=self.timeout_s)

    async def oidc_auth_url(self, token: str, client: rpc.ClientInfo) -> tuple[str, str, str, int]:
        """(authorization URL, button name, browser-binding cookie, its max age)."""
        key = await self.core_key()
        request = rpc.OidcAuthUrlRequest(token_sealed=seal(key, token), client=client, reply_key=self.reply_key.public)
        result = await self.bus.call(subjects.RPC_OIDC_AUTH_URL, request, rpc.OidcAuthUrlResult, timeout=self.timeout_s)
        return (self.reply_key.open(result.url_sealed), result.button_display_name,
                self.reply_key.open(result.cookie_sealed), result.cookie_max_age_s)

    async def oidc_callback(
        self, state: str, code: str | None, iss: str | None, error: str | None, cookie: str | None, client: rpc.ClientInfo
    ) -> None:
        key = await self.core_key()
        request = rpc.OidcCallbackRequest(
            state_sealed=seal(key, state),
            code_sealed=seal(key, code) if code else None,
            iss=iss,
            error=error,
            cookie_sealed=seal(key, cookie) if cookie else None,
            client=client,
        )
        await self.bus.call(subjects.RPC_OIDC_CALLBACK, request, rpc.Empty, timeout=self.timeout_s)


class BusHolder:
    """The proxy's bus connection, made in the background so that the proxy serves (503s)
    while NATS is down."""

    def __init__(self) -> None:
        self.bus: Bus | None = None
