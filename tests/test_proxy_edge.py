"""Client address, rate limit and body limit of the HTTP edge."""
from __future__ import annotations

import httpx
import pytest

from events.bus import Bus
from proxy_service.app import create_app
from proxy_service.edge import ClientAddress, RateLimiter
from proxy_service.settings import ProxySettings


def test_forwarded_for_is_believed_only_from_configured_proxies() -> None:
    address = ClientAddress(["10.0.0.0/8", "192.0.2.1"])
    assert address.of("203.0.113.5", "198.51.100.1") == "203.0.113.5"  # not a proxy: header ignored
    assert address.of("192.0.2.1", "198.51.100.1") == "198.51.100.1"
    # the right-most address that is not one of ours is the client; left of it is client-controlled
    assert address.of("10.1.1.1", "6.6.6.6, 198.51.100.1, 10.2.2.2") == "198.51.100.1"
    assert address.of("10.1.1.1", "garbage") == "10.1.1.1"
    assert address.of("10.1.1.1", None) == "10.1.1.1"


def test_rate_limiter_allows_a_burst_then_refills() -> None:
    limiter = RateLimiter(per_second=2, burst=3)
    assert [limiter.acquire("a", now=0.0) for _ in range(3)] == [0.0, 0.0, 0.0]
    assert limiter.acquire("a", now=0.0) == pytest.approx(0.5)
    assert limiter.acquire("b", now=0.0) == 0.0  # per client
    assert limiter.acquire("a", now=0.5) == 0.0
    assert not RateLimiter(0, 5).enabled


async def test_proxy_rate_limits_per_client_with_retry_after(nats_url: str) -> None:
    bus = await Bus.connect(nats_url, "test", wait_s=5)
    settings = ProxySettings(nats_url=nats_url, rate_limit_per_s=1, rate_limit_burst=2, max_body_bytes=1000)
    app = create_app(settings, bus=bus)
    transport = httpx.ASGITransport(app=app, client=("198.51.100.9", 1234))
    try:
        async with httpx.AsyncClient(transport=transport, base_url="http://proxy") as client:
            body = {"location_id": 1, "pubkey": "x", "method": 0}
            codes = [(await client.post("/api/v1/client-mfa/start", json=body)).status_code for _ in range(3)]
            assert codes[:2] == [503, 503]  # let through (no core answers), then limited
            limited = await client.post("/api/v1/client-mfa/start", json=body)
            assert limited.status_code == 429 and limited.json() == {"error": "too many requests"}
            assert int(limited.headers["retry-after"]) >= 1
            assert (await client.get("/api/v1/health")).status_code == 200  # health is never limited
            big = await client.post("/api/v1/client-mfa/finish", content=b"{" + b" " * 2000 + b"}")
            assert (big.status_code, big.json()) == (413, {"error": "request body too large"})
    finally:
        await bus.close()
