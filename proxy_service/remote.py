"""The desktop's side of mobile approval: a WebSocket that waits until a phone approved
the login, then finishes it over RPC and sends the PSK down the socket, once.

The phone's approval may land on any proxy: the core announces it on
wgmfa.notify.login.<login id> (no secret in it), and this proxy, holding the socket,
finishes the login itself. The status is also polled now and then, so that a lost
wake-up costs seconds, not the login.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Iterator

from fastapi import WebSocket
from fastapi.responses import JSONResponse
from starlette.websockets import WebSocketDisconnect, WebSocketState

from events import subjects
from events.bus import Bus, BusUnavailable, EventRouter
from proxy_service.core_client import CoreClient
from schemas.common import utcnow
from schemas.events import LoginApproved
from schemas.http import RemoteMfaSuccess
from schemas.rpc import ClientInfo, RpcFailure, TokenStatusResult

log = logging.getLogger("proxy_service.remote")

POLL_S = 5.0
MOBILE_APPROVE = "mobile_approve"


class ApprovalWakeups:
    """The approvals this proxy's sockets wait for, woken by the core's notifications."""

    def __init__(self) -> None:
        self._waiting: dict[str, set[asyncio.Event]] = {}

    def router(self, bus: Bus) -> EventRouter:
        router = bus.router()
        router.listen(subjects.NOTIFY_LOGIN_ALL, self.on_login_approved)
        return router

    async def on_login_approved(self, event: LoginApproved) -> None:
        """A phone approved a login: wake the socket waiting for it, if it is on this proxy."""
        for approved in self._waiting.get(str(event.login_id), ()):
            approved.set()

    @contextlib.contextmanager
    def waiting(self, login_id: object) -> Iterator[asyncio.Event]:
        approved = asyncio.Event()
        waiters = self._waiting.setdefault(str(login_id), set())
        waiters.add(approved)
        try:
            yield approved
        finally:
            waiters.discard(approved)
            if not waiters:
                self._waiting.pop(str(login_id), None)


async def deny(websocket: WebSocket, status: int, message: str) -> None:
    """An HTTP answer instead of the upgrade, as Defguard's proxy gives; a close with the
    reason where the server cannot."""
    if "websocket.http.response" in websocket.scope.get("extensions", {}):
        await websocket.send_denial_response(JSONResponse({"error": message}, status_code=status))
    else:
        await websocket.close(code=1008, reason=message[:120])


async def wait_for_approval(
    websocket: WebSocket,
    core: CoreClient,
    wakeups: ApprovalWakeups,
    token: str,
    client: ClientInfo,
    http_status: Callable[[RpcFailure], int],
) -> None:
    try:
        status = await core.token_status(token)
    except RpcFailure as exc:
        await deny(websocket, http_status(exc), exc.error.message)
        return
    except BusUnavailable:
        await deny(websocket, 503, "core unavailable")
        return
    if status.method != MOBILE_APPROVE:
        await deny(websocket, 400, "invalid MFA method")
        return
    await websocket.accept()
    with wakeups.waiting(status.login_id) as approved:
        await _until_approved(websocket, core, token, client, status, approved)


async def _until_approved(
    websocket: WebSocket, core: CoreClient, token: str, client: ClientInfo, status: TokenStatusResult, approved: asyncio.Event
) -> None:
    closed_by_client = asyncio.create_task(_until_closed(websocket))
    try:
        state = status.state
        deadline = asyncio.get_running_loop().time() + max((status.expires_at - utcnow()).total_seconds(), 0.0)
        while state != "approved":
            remaining = deadline - asyncio.get_running_loop().time()
            if remaining <= 0:
                await _close(websocket, 1000, "login expired")
                return
            woken = asyncio.create_task(approved.wait())
            done, _ = await asyncio.wait({woken, closed_by_client}, timeout=min(POLL_S, remaining),
                                         return_when=asyncio.FIRST_COMPLETED)
            woken.cancel()
            approved.clear()
            if closed_by_client in done:
                log.info("the desktop closed its socket before the approval")
                return
            try:
                state = (await core.token_status(token)).state
            except RpcFailure:
                await _close(websocket, 1000, "login session not found")
                return
            except BusUnavailable:
                continue  # try again at the next wake-up or poll
        try:
            psk, _ = await core.finish(token, None, None, client)
        except (RpcFailure, BusUnavailable) as exc:
            reason = exc.error.message if isinstance(exc, RpcFailure) else "core unavailable"
            await _close(websocket, 1011, reason)
            return
        await websocket.send_text(RemoteMfaSuccess(preshared_key=psk).model_dump_json())
        await _close(websocket, 1000, "done")
    finally:
        closed_by_client.cancel()


async def _until_closed(websocket: WebSocket) -> None:
    with contextlib.suppress(WebSocketDisconnect, RuntimeError):
        while True:
            message = await websocket.receive()
            if message["type"] == "websocket.disconnect":
                return


async def _close(websocket: WebSocket, code: int, reason: str) -> None:
    if websocket.client_state == WebSocketState.CONNECTED:
        with contextlib.suppress(Exception):
            await websocket.close(code=code, reason=reason)

