"""HTTP edge concerns that are not routes: client address, rate limit, request bodies."""
from __future__ import annotations

import asyncio
import ipaddress
import json
import math
import time
from collections import OrderedDict
from dataclasses import dataclass

from starlette.types import ASGIApp, Message, Receive, Scope, Send
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol


class ClientAddress:
    """The client's address: the socket peer, or, when the peer is a configured proxy, the
    right-most address in X-Forwarded-For that is not a configured proxy."""

    def __init__(self, trusted: list[str]) -> None:
        self.trusted = [ipaddress.ip_network(t, strict=False) for t in trusted]

    def is_trusted(self, address: str) -> bool:
        try:
            ip = ipaddress.ip_address(address)
        except ValueError:
            return False
        return any(ip in net for net in self.trusted)

    def of(self, peer: str | None, forwarded_for: str | None) -> str | None:
        if peer is None or not forwarded_for or not self.is_trusted(peer):
            return peer
        hops = [h.strip() for h in forwarded_for.split(",") if h.strip()]
        for hop in reversed(hops):
            if not self.is_trusted(hop):
                try:
                    return str(ipaddress.ip_address(hop))
                except ValueError:
                    return peer  # a forged or garbled header: fall back to the proxy itself
        return hops[0] if hops else peer


@dataclass
class _Bucket:
    tokens: float
    updated: float


class RateLimiter:
    """A token bucket per client address; the least recently seen addresses are forgotten
    beyond `max_clients`."""

    def __init__(self, per_second: float, burst: int, *, max_clients: int = 100_000) -> None:
        self.per_second = per_second
        self.burst = max(burst, 1)
        self.max_clients = max_clients
        self._buckets: OrderedDict[str, _Bucket] = OrderedDict()

    @property
    def enabled(self) -> bool:
        return self.per_second > 0

    def acquire(self, client: str, now: float | None = None) -> float:
        """0 when the request may go ahead, else the seconds to wait."""
        now = time.monotonic() if now is None else now
        bucket = self._buckets.pop(client, None) or _Bucket(tokens=float(self.burst), updated=now)
        bucket.tokens = min(self.burst, bucket.tokens + (now - bucket.updated) * self.per_second)
        bucket.updated = now
        self._buckets[client] = bucket
        if len(self._buckets) > self.max_clients:
            self._buckets.popitem(last=False)
        if bucket.tokens >= 1:
            bucket.tokens -= 1
            return 0.0
        return (1 - bucket.tokens) / self.per_second


class BodyGuard:
    """Reads every request body before any route sees it, so that the edge answers the
    same way on every route, present and future: over `limit` bytes, by Content-Length or
    while reading (chunked), 413; a JSON body (or one without a content type) that is not
    UTF-8 or is nested too deeply to parse, 400 `invalid request: …`."""

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers", []))
        try:
            declared = int(headers.get(b"content-length", b"0"))
        except ValueError:
            declared = 0
        if declared > self.limit:
            await _json_error(send, 413, "request body too large")
            return
        chunks: list[bytes] = []
        received = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return  # the client went away
            chunk = message.get("body", b"")
            received += len(chunk)
            if received > self.limit:
                await self._refuse_too_large(receive, send, more=message.get("more_body", False))
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        problem = _json_problem(body, headers.get(b"content-type"))
        if problem is not None:
            await _json_error(send, 400, f"invalid request: {problem}")
            return
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)


    async def _refuse_too_large(self, receive: Receive, send: Send, *, more: bool) -> None:
        """413 once the client stopped sending: a client still writing when the server
        closes gets a reset, not the answer. Beyond a bound the rest is not read, and the
        connection closes after the answer."""
        drained = 0
        while more and drained <= DRAIN_LIMIT_FACTOR * self.limit:
            message = await receive()
            if message["type"] != "http.request":
                return
            drained += len(message.get("body", b""))
            more = message.get("more_body", False)
        await _json_error(send, 413, "request body too large", close=more)


DRAIN_LIMIT_FACTOR = 16


def _json_problem(body: bytes, content_type: bytes | None) -> str | None:
    """Why a JSON body cannot be parsed, for what the JSON parser would only call an
    error parsing the body; None when it is fine or not JSON (syntax errors are reported
    by the routes' validation, with their position)."""
    if not body:
        return None
    if content_type is not None:
        media = content_type.split(b";")[0].strip().lower()
        if not (media == b"application/json" or (media.startswith(b"application/") and media.endswith(b"+json"))):
            return None
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as exc:
        return f"the body is not UTF-8 (byte {exc.start})"
    try:
        json.loads(text)
    except RecursionError:
        return "JSON nested too deeply"
    except ValueError:
        return None
    return None


async def _json_error(send: Send, status: int, message: str, *, close: bool = False) -> None:
    """`close`: the rest of the request is not read, so the connection cannot carry another."""
    body = json.dumps({"error": message}).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    if close:
        headers.append((b"connection", b"close"))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def retry_after_header(seconds: float) -> str:
    return str(max(1, math.ceil(seconds)))


def slow_client_protocol(read_timeout_s: float, max_per_address: int, trusted: ClientAddress) -> type:
    """uvicorn's HTTP/1.1 protocol (httptools' parser, in C: h11's, in Python, was a sixth
    of the proxy's CPU per request), with two limits on what a client can hold: a request's
    headers and body must arrive within `read_timeout_s` of its start (a new connection,
    or the end of the previous response), and one address (not a trusted proxy) holds at
    most `max_per_address` connections; past either, the connection is closed."""
    open_by_address: dict[str, int] = {}

    class EdgeProtocol(HttpToolsProtocol):  # type: ignore[misc]
        _deadline: asyncio.TimerHandle | None = None
        _counted: str | None = None
        _receiving = False  # a request begun and not yet whole

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            address = self.client[0] if self.client else None
            if address is not None and max_per_address > 0 and not trusted.is_trusted(address):
                if open_by_address.get(address, 0) >= max_per_address:
                    transport.close()
                    return
                open_by_address[address] = open_by_address.get(address, 0) + 1
                self._counted = address
            self._arm()

        def _arm(self) -> None:
            self._disarm()
            if read_timeout_s > 0:
                self._deadline = self.loop.call_later(read_timeout_s, self._too_slow)

        def _disarm(self) -> None:
            if self._deadline is not None:
                self._deadline.cancel()
                self._deadline = None

        def _too_slow(self) -> None:
            self._deadline = None
            if not self.transport.is_closing():
                self.transport.close()

        def _uncount(self) -> None:
            if self._counted is not None:
                left = open_by_address.get(self._counted, 1) - 1
                if left > 0:
                    open_by_address[self._counted] = left
                else:
                    open_by_address.pop(self._counted, None)
                self._counted = None

        def on_message_begin(self) -> None:
            super().on_message_begin()
            self._receiving = True

        def on_message_complete(self) -> None:
            super().on_message_complete()
            self._receiving = False
            self._disarm()  # the whole request arrived: the handler has it now

        def on_response_complete(self) -> None:
            super().on_response_complete()
            # the next request on this connection has as long as the first, unless it
            # arrived whole already (pipelined) and is being handled
            waiting = not self._receiving and self.cycle is not None and not self.cycle.response_complete
            if not self.transport.is_closing() and not waiting:
                self._arm()

        def handle_websocket_upgrade(self) -> None:
            self._disarm()
            self._uncount()  # the WebSocket protocol takes the connection over
            super().handle_websocket_upgrade()

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm()
            self._uncount()
            super().connection_lost(exc)

    return EdgeProtocol
