import asyncio
import warnings

import uvicorn
from prometheus_client import CollectorRegistry

from runtime.logs import configure_logging
from runtime.settings import load_settings
from proxy_service.app import create_app, metrics_app
from proxy_service.edge import ClientAddress, slow_client_protocol
from proxy_service.settings import ProxySettings

# The websockets implementation is the one that can answer an upgrade with an HTTP error
# (Defguard's proxy answers a bad token on /client-mfa/remote with 400/401 JSON).
warnings.filterwarnings("ignore", message=".*websockets.*deprecated.*")
settings = load_settings(ProxySettings)
configure_logging("proxy", settings.log_level)
registry = CollectorRegistry()  # the client port serves it only when asked to
app = create_app(settings, registry=registry)
client_facing = uvicorn.Server(
    uvicorn.Config(
        app,
        host=settings.proxy_host,
        port=settings.proxy_port,
        access_log=False,
        log_config=None,
        proxy_headers=False,
        server_header=False,
        ws="websockets",
        http=slow_client_protocol(
            settings.request_read_timeout_s, settings.max_connections_per_address, ClientAddress(settings.trusted_proxies)
        ),
    )
)


async def main() -> None:
    metrics = None
    if settings.metrics_port is not None:
        metrics = uvicorn.Server(
            uvicorn.Config(
                metrics_app(registry),
                host=settings.metrics_host,
                port=settings.metrics_port,
                access_log=False,
                log_config=None,
                server_header=False,
                lifespan="off",
            )
        )
    serving = asyncio.create_task(metrics.serve()) if metrics is not None else None
    try:
        await client_facing.serve()
    finally:
        if metrics is not None and serving is not None:
            metrics.should_exit = True
            await serving


asyncio.run(main())
