import asyncio
import warnings

import uvicorn
from prometheus_client import CollectorRegistry

from events.bus import DEAD_LETTERS
from runtime.logs import configure_logging
from runtime.metrics import serving_metrics
from runtime.service import settle_garbage_collector
from runtime.settings import load_settings
from proxy_service.app import create_app
from proxy_service.edge import ClientAddress, slow_client_protocol
from proxy_service.settings import ProxySettings

# The websockets implementation is the one that can answer an upgrade with an HTTP error
# (Defguard's proxy answers a bad token on /client-mfa/remote with 400/401 JSON).
warnings.filterwarnings("ignore", message=".*websockets.*deprecated.*")
settings = load_settings(ProxySettings)
configure_logging("proxy", settings.log_level)
registry = CollectorRegistry()  # the client port serves it only when asked to
registry.register(DEAD_LETTERS)
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
    settle_garbage_collector()  # the app is made; its NATS connection comes once serving
    async with serving_metrics(registry, settings.metrics_host, settings.metrics_port):
        await client_facing.serve()


asyncio.run(main())
