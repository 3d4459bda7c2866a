"""python -m gateway_worker --credentials FILE [--backend userspace|kernel] ..."""
import argparse
import asyncio
import json
import logging
import sys
from pathlib import Path

from pydantic import ValidationError

from runtime.logs import configure_logging
from runtime.metrics import serving_metrics
from runtime.service import run_until_signalled
from runtime.settings import load_settings
from gateway_worker import metrics
from gateway_worker.app import Gateway
from wireguard.port import BackendUnavailable
from wireguard import create_backend
from gateway_worker.settings import GatewaySettings
from schemas.rpc import GatewayCredentials

log = logging.getLogger("gateway_worker")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m gateway_worker", description="apply a location's peers to a WireGuard interface")
    parser.add_argument("--credentials", type=Path, help="the location's gateway credentials file (or WGMFA_CREDENTIALS)")
    parser.add_argument("--backend", choices=["userspace", "kernel"], help="default userspace (wireguard-go)")
    parser.add_argument("--gateway-id", help="this gateway's name (default: the host name)")
    parser.add_argument("--interface", help="interface name (default wgmfa<location id>)")
    parser.add_argument("--netns", help="network namespace for the interface")
    parser.add_argument("--remove-interface-on-exit", action="store_true", default=None)
    return parser.parse_args()


async def main() -> int:
    args = parse_args()
    overrides = {k: v for k, v in vars(args).items() if v is not None}
    settings = load_settings(GatewaySettings, **overrides)
    configure_logging("gateway", settings.log_level)
    if settings.credentials is None:
        log.error("no credentials: pass --credentials FILE (wgmfa admin gateway add LOCATION writes one)")
        return 2
    try:
        credentials = GatewayCredentials.model_validate(json.loads(settings.credentials.read_text()))
    except (OSError, ValueError, ValidationError) as exc:
        log.error("cannot read the credentials file %s: %s", settings.credentials, exc)
        return 2
    try:
        backend = create_backend(settings.backend)
    except BackendUnavailable as exc:
        log.error("%s", exc)
        return 3
    try:
        async with serving_metrics(metrics.registry, settings.metrics_host, settings.gateway_metrics_port):
            await run_until_signalled("gateway", settings, Gateway(settings, credentials, backend))
    except BackendUnavailable as exc:
        log.error("%s", exc)
        return 3
    return 0


sys.exit(asyncio.run(main()))
