import warnings

import uvicorn

from events.logs import configure_logging
from proxy_service.app import create_app
from proxy_service.settings import ProxySettings

# The websockets implementation is the one that can answer an upgrade with an HTTP error
# (Defguard's proxy answers a bad token on /client-mfa/remote with 400/401 JSON).
warnings.filterwarnings("ignore", message=".*websockets.*deprecated.*")
settings = ProxySettings()
configure_logging("proxy", settings.log_level)
uvicorn.Server(
    uvicorn.Config(
        create_app(settings),
        host=settings.proxy_host,
        port=settings.proxy_port,
        access_log=False,
        log_config=None,
        proxy_headers=False,
        server_header=False,
        ws="websockets",
    )
).run()
