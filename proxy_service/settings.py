from __future__ import annotations

from pydantic import Field

from events.settings import BusSettings


class ProxySettings(BusSettings):
    proxy_host: str = "127.0.0.1"
    proxy_port: int = 8080
    public_url: str = "http://127.0.0.1:8080"
    """The URL clients reach the proxy at (OIDC redirect URIs, device configs)."""
    max_body_bytes: int = 64 * 1024
    """Larger request bodies get 413."""
    rate_limit_per_s: float = 10.0
    """Requests per second per client address on /api/v1 (0 turns the limit off)."""
    rate_limit_burst: int = 30
    trusted_proxies: list[str] = Field(default_factory=list)
    """Addresses or networks (JSON list) whose X-Forwarded-For header is believed."""
