"""Prometheus text at /metrics on a port of its own, for every service process.

Each service owns one `CollectorRegistry` (its package's `metrics` module) holding its
domain metrics and the bus's dead-letter counter; this module only serves one."""
from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable

import uvicorn
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from starlette.responses import JSONResponse, Response
from starlette.types import ASGIApp, Receive, Scope, Send

log = logging.getLogger("runtime.metrics")

BeforeScrape = Callable[[], Awaitable[None]]


def metrics_app(registry: CollectorRegistry, *, before_scrape: BeforeScrape | None = None) -> ASGIApp:
    """The registry's Prometheus text at /metrics. `before_scrape` brings gauges that are
    read from elsewhere (the database) up to date; when it fails, the last values are served."""

    async def serve(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        if scope["path"] != "/metrics":
            response: Response = JSONResponse({"error": "not found"}, status_code=404)
        else:
            if before_scrape is not None:
                try:
                    await before_scrape()
                except Exception as exc:
                    log.warning("refreshing metrics before a scrape failed: %s", exc)
            response = Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)
        await response(scope, receive, send)

    return serve


@contextlib.asynccontextmanager
async def serving_metrics(
    registry: CollectorRegistry, host: str, port: int | None, *, before_scrape: BeforeScrape | None = None
) -> AsyncIterator[None]:
    """Serve the registry on host:port while the block runs; nothing when port is None."""
    if port is None:
        yield
        return
    server = uvicorn.Server(
        uvicorn.Config(
            metrics_app(registry, before_scrape=before_scrape),
            host=host,
            port=port,
            access_log=False,
            log_config=None,
            server_header=False,
            lifespan="off",
        )
    )
    serving = asyncio.create_task(server.serve(), name=f"metrics on {host}:{port}")
    try:
        yield
    finally:
        server.should_exit = True
        with contextlib.suppress(Exception):
            await asyncio.wait_for(serving, 5)
