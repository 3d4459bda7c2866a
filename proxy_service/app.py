"""The FastAPI application: Defguard-compatible client MFA routes (the OIDC pages in
proxy_service.openid), health and metrics."""
from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator

from fastapi import FastAPI, Request, WebSocket
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from events import permissions
from events.bus import Bus, BusUnavailable
from proxy_service import enrollment
from proxy_service.core_client import BusHolder, CoreClient
from proxy_service.edge import BodyGuard, ClientAddress, RateLimiter, retry_after_header
from proxy_service.openapi import document_edge_errors, errors
from proxy_service.openid import add_openid_routes
from proxy_service.remote import ApprovalWakeups, deny, wait_for_approval
from proxy_service.settings import ProxySettings
from schemas.http import (
    ClientMfaFinishRemoteRequest,
    ClientMfaFinishRequest,
    ClientMfaFinishResponse,
    ClientMfaStartRequest,
    ClientMfaStartResponse,
)
from schemas.rpc import ClientInfo, ErrorStatus, RpcFailure

log = logging.getLogger("proxy_service")
access_log = logging.getLogger("proxy_service.access")

HTTP_STATUS = {
    ErrorStatus.INVALID_ARGUMENT: 400,
    ErrorStatus.UNAUTHENTICATED: 401,
    ErrorStatus.PERMISSION_DENIED: 403,
    ErrorStatus.NOT_FOUND: 404,
    ErrorStatus.CONFLICT: 409,
    ErrorStatus.FAILED_PRECONDITION: 428,
    ErrorStatus.RATE_LIMITED: 429,
    ErrorStatus.UNAVAILABLE: 503,
    ErrorStatus.INTERNAL: 500,
}
INTERNAL_ERROR = "Internal server error"
CORE_UNAVAILABLE = "core unavailable"


def error(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=headers)


def describe_request_error(exc: RequestValidationError) -> str:
    """The reason a body was refused, without echoing the values (they may be secrets)."""
    parts = []
    for err in exc.errors():
        loc = [str(p) for p in err.get("loc", ()) if p != "body"]
        if err.get("type") == "json_invalid":
            parts.append(f"invalid JSON: {err.get('ctx', {}).get('error', err.get('msg'))}")
        elif err.get("type") == "model_attributes_type" or not loc:
            parts.append(f"body: {err.get('msg')}")
        else:
            parts.append(f"{'.'.join(loc)}: {err.get('msg')}")
    return "invalid request: " + "; ".join(parts)


def create_app(
    settings: ProxySettings, *, bus: Bus | None = None, registry: CollectorRegistry | None = None
) -> FastAPI:
    holder = BusHolder()
    holder.bus = bus
    core = CoreClient(holder, settings.rpc_timeout_s)
    wakeups = ApprovalWakeups()
    client_address = ClientAddress(settings.trusted_proxies)
    limiter = RateLimiter(settings.rate_limit_per_s, settings.rate_limit_burst)
    registry = registry or CollectorRegistry()
    requests_total = Counter(
        "wgmfa_proxy_requests", "HTTP requests by route and status", ["route", "status"], registry=registry
    )
    latency = Histogram("wgmfa_proxy_request_seconds", "HTTP request latency by route", ["route"], registry=registry)

    @contextlib.asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        connector = None
        if bus is not None:
            await bus.serve(wakeups.router(bus))
        else:

            async def connect() -> None:
                connected = await Bus.connect_as(settings, permissions.PROXY, "proxy", registry=registry)
                await connected.serve(wakeups.router(connected))
                holder.bus = connected
                log.info("connected to NATS")

            connector = asyncio.create_task(connect())
        log.info("proxy listening on %s:%s", settings.proxy_host, settings.proxy_port)
        yield
        if connector is not None:
            connector.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await connector
        if holder.bus is not None and bus is None:
            await holder.bus.close()

    app = FastAPI(title="wgmfa proxy", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url="/api/v1/openapi.json")

    def openapi() -> dict:
        if app.openapi_schema is None:
            schema = get_openapi(title=app.title, version=app.version, routes=app.routes)
            document_edge_errors(schema)
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
    app.state.core = core
    app.state.holder = holder

    def client_info(request: Request) -> ClientInfo:
        peer = request.client.host if request.client else None
        ip = client_address.of(peer, request.headers.get("x-forwarded-for"))
        user_agent = request.headers.get("user-agent")
        if user_agent and "<" in user_agent:  # looks like markup: do not carry it into audit logs
            user_agent = None
        return ClientInfo(ip=ip, user_agent=user_agent[:512] if user_agent else None)

    async def edge(scope: Scope, receive: Receive, send: Send, routes: ASGIApp) -> None:
        """Rate limit, `Cache-Control: no-store` on the API, metrics and the access log.
        Plain ASGI: Starlette's BaseHTTPMiddleware ran every request in a task of its own
        with its body and answer copied through streams."""
        if scope["type"] != "http":
            await routes(scope, receive, send)
            return
        started = time.perf_counter()
        route = scope["path"]
        status = 500
        answered = False

        async def observed(message: Message) -> None:
            nonlocal status, answered
            if message["type"] == "http.response.start":
                status, answered = message["status"], True
                if route.startswith("/api/"):
                    message["headers"] = [*message.get("headers", []), (b"cache-control", b"no-store")]
            await send(message)

        try:
            if limiter.enabled and route.startswith("/api/v1/") and not route.endswith("/health"):
                ip = client_info(Request(scope)).ip or "unknown"
                wait = limiter.acquire(ip)
                if wait > 0:
                    await error(429, "too many requests", {"Retry-After": retry_after_header(wait)})(scope, receive, observed)
                    return
            try:
                await routes(scope, receive, observed)
            except Exception:
                log.exception("unhandled error on %s %s", scope["method"], route)
                if answered:
                    raise
                await error(500, INTERNAL_ERROR)(scope, receive, observed)
        finally:
            _record(scope, route, status, started)

    def _record(scope: Scope, route: str, status: int, started: float) -> None:
        elapsed = time.perf_counter() - started
        label = getattr(scope.get("route"), "path", "unmatched")
        requests_total.labels(label, str(status)).inc()
        latency.labels(label).observe(elapsed)
        # the path only: query strings may carry tokens
        access_log.info("%s %s %s %.1fms", scope["method"], route, status, elapsed * 1000)

    class Edge:
        """`edge` inside Starlette's outermost error handler, so that an unhandled error
        becomes the JSON 500 here."""

        def __init__(self, routes: ASGIApp) -> None:
            self.routes = routes

        async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
            await edge(scope, receive, send, self.routes)

    app.add_middleware(Edge)

    @app.exception_handler(RequestValidationError)
    async def on_invalid_body(_request: Request, exc: RequestValidationError) -> JSONResponse:
        return error(400, describe_request_error(exc))

    @app.exception_handler(StarletteHTTPException)
    async def on_http_error(_request: Request, exc: StarletteHTTPException) -> JSONResponse:
        message = exc.detail if isinstance(exc.detail, str) else "error"
        return error(exc.status_code, message.lower() if message in ("Not Found", "Method Not Allowed") else message)

    @app.exception_handler(RpcFailure)
    async def on_core_error(_request: Request, exc: RpcFailure) -> JSONResponse:
        status = HTTP_STATUS.get(exc.error.status, 500)
        if status == 500:
            return error(500, INTERNAL_ERROR)
        headers = {"Retry-After": str(exc.error.retry_after_s)} if exc.error.retry_after_s else None
        return error(status, exc.error.message, headers)

    @app.exception_handler(BusUnavailable)
    async def on_bus_unavailable(_request: Request, exc: BusUnavailable) -> JSONResponse:
        log.warning("core unavailable: %s", exc)
        return error(503, CORE_UNAVAILABLE)

    @app.post("/api/v1/client-mfa/start", response_model=ClientMfaStartResponse, responses=errors(403))
    async def client_mfa_start(body: ClientMfaStartRequest, request: Request) -> ClientMfaStartResponse:
        token, challenge = await core.start(body.location_id, body.pubkey, body.method, client_info(request))
        return ClientMfaStartResponse(token=token, challenge=challenge)

    @app.post("/api/v1/client-mfa/finish", response_model=ClientMfaFinishResponse, responses=errors(401, 428))
    async def client_mfa_finish(body: ClientMfaFinishRequest, request: Request) -> ClientMfaFinishResponse:
        psk, token = await core.finish(body.token, body.code, body.auth_pub_key, client_info(request))
        return ClientMfaFinishResponse(preshared_key=psk, token=token)

    @app.post("/api/v1/client-mfa/finish-remote", responses=errors(401))
    async def client_mfa_finish_remote(body: ClientMfaFinishRemoteRequest, request: Request) -> JSONResponse:
        await core.finish_remote(body.token, body.code, body.auth_pub_key, client_info(request))
        return JSONResponse({})

    @app.websocket("/api/v1/client-mfa/remote")
    async def client_mfa_remote(websocket: WebSocket) -> None:
        token = websocket.query_params.get("token")
        peer = websocket.client.host if websocket.client else None
        client = ClientInfo(ip=client_address.of(peer, websocket.headers.get("x-forwarded-for")))
        access_log.info("WS /api/v1/client-mfa/remote from %s", client.ip)  # never the query: it holds the token
        if not token:
            await deny(websocket, 400, "invalid token")
            return
        await wait_for_approval(websocket, core, wakeups, token, client, lambda exc: HTTP_STATUS.get(exc.error.status, 500))

    app.include_router(enrollment.create_router(settings, core, client_info))

    add_openid_routes(app, core, settings, client_info, on_core_error)

    @app.get("/api/v1/health", responses=errors(503))
    @app.get("/health", include_in_schema=False)
    async def health() -> JSONResponse:
        if holder.bus is None or not holder.bus.connected:
            return error(503, "not connected to NATS")
        return JSONResponse({"status": "ok"})

    if settings.metrics_on_client_port:

        @app.get("/metrics", include_in_schema=False)
        @app.get("/api/v1/metrics", include_in_schema=False)
        async def metrics() -> Response:
            return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    return enrollment.DefguardHeaders(BodyGuard(app, settings.max_body_bytes), holder)  # type: ignore[return-value]
