from __future__ import annotations

from pydantic import Field

from runtime.settings import BusSettings


class ProxySettings(BusSettings):
    proxy_host: str = "127.0.0.1"
    proxy_port: int = Field(8080, ge=1, le=65535)
    public_url: str = "http://127.0.0.1:8080"
    """The URL clients reach the proxy at (OIDC redirect URIs, device configs)."""
    max_body_bytes: int = Field(64 * 1024, ge=1, le=16 << 20)
    """Larger request bodies get 413."""
    rate_limit_per_s: float = Field(10.0, ge=0)
    """Requests per second per client address on /api/v1 (0 turns the limit off)."""
    rate_limit_burst: int = Field(30, ge=1)
    trusted_proxies: list[str] = Field(default_factory=list)
    """Addresses or networks (JSON list) whose X-Forwarded-For header is believed."""
    request_read_timeout_s: float = Field(5.0, gt=0)
    """A request's headers and body must arrive within this; slower connections are cut."""
    max_connections_per_address: int = Field(64, ge=0)
    """Open connections per client address (0: no limit); trusted proxies are exempt."""
    metrics_port: int | None = Field(None, ge=1, le=65535)
    """Serve /metrics on this port (on metrics_host) for Prometheus; none by default."""
    metrics_on_client_port: bool = False
    """Also serve /metrics on the client-facing port (it tells anyone the traffic)."""
