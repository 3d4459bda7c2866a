"""The HTTP edge as clients meet it on a running proxy: slow clients cut, connections per
address bounded, /metrics off the client port, and the OpenAPI document true to the
statuses the API answers."""
from __future__ import annotations

import base64
import json
import socket
import time
from pathlib import Path

import httpx
import pyotp
from nacl.signing import SigningKey

from schemas import rpc
from tests.conftest import running_nats
from tests.support.stack import Stack, eventually, free_port

API = "/api/v1"


def closed_by_server(sock: socket.socket, *, dribble: bytes = b"", within_s: float = 40.0) -> bool:
    """Whether the server closes `sock` within `within_s`, while the client sends `dribble`
    a byte at a time, one every 0.2 s. A generous bound: this is about never, not about
    how fast."""
    sock.settimeout(0.2)
    deadline = time.monotonic() + within_s
    position = 0
    while time.monotonic() < deadline:
        try:
            if sock.recv(4096) == b"":
                return True
        except TimeoutError:
            pass
        except ConnectionError:
            return True
        if position < len(dribble):
            try:
                sock.send(dribble[position:position + 1])
            except OSError:
                return True
            position += 1
    return False


async def test_slow_clients_are_cut_and_connections_per_address_bounded(tmp_path: Path) -> None:
    with running_nats() as nats:
        stack = Stack(nats.url, tmp_path, rate_limit_per_s="0", request_read_timeout_s="8", max_connections_per_address="3")
        await stack.start()
        try:
            address = ("127.0.0.1", stack.proxy_port)
            head = b"POST /api/v1/client-mfa/start HTTP/1.1\r\nHost: proxy\r\nContent-Type: application/json\r\n"
            with socket.create_connection(address) as headers:  # headers that never end
                assert closed_by_server(headers, dribble=head + b"X-Slow: " + b"a" * 10_000)
            with socket.create_connection(address) as body:  # a body that never ends
                body.sendall(head + b"Content-Length: 1000\r\n\r\n")
                assert closed_by_server(body, dribble=b"{" + b" " * 10_000)

            held = [socket.create_connection(address) for _ in range(3)]
            try:
                with socket.create_connection(address) as fourth:
                    assert closed_by_server(fourth, within_s=7)  # at once, before the others time out
            finally:
                for sock in held:
                    sock.close()
            health = await stack.http.get(f"{API}/health")  # the proxy goes on serving
            assert health.status_code == 200
        finally:
            await stack.stop()


async def test_metrics_are_served_away_from_the_client_port_unless_asked(tmp_path: Path) -> None:
    with running_nats() as nats:
        metrics_port = free_port()
        stack = Stack(nats.url, tmp_path / "a", metrics_port=str(metrics_port))
        await stack.start()
        try:
            for path in ("/metrics", f"{API}/metrics"):
                response = await stack.http.get(path)
                assert (response.status_code, response.json()) == (404, {"error": "not found"}), path
            async with httpx.AsyncClient() as client:
                metrics = await client.get(f"http://127.0.0.1:{metrics_port}/metrics")
            assert metrics.status_code == 200 and "wgmfa_proxy_requests_total" in metrics.text
        finally:
            await stack.stop()
        stack = Stack(nats.url, tmp_path / "b", metrics_on_client_port="true")
        await stack.start()
        try:
            assert (await stack.http.get("/metrics")).status_code == 200
        finally:
            await stack.stop()


def b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode()


async def test_every_status_the_openapi_document_names_is_one_the_api_answers(tmp_path: Path) -> None:
    """Each documented (route, status) is provoked for real; nothing else is documented."""
    with running_nats() as nats:
        stack = Stack(nats.url, tmp_path, trusted_proxies='["127.0.0.1"]', rate_limit_per_s="0.001",
                      rate_limit_burst="30", rpc_timeout_s="1", mfa_hard_lock_failures="10")
        await stack.start()
        seen: dict[tuple[str, int], int] = {}
        n = 0

        async def call(path: str, status: int, body: object = None, *, raw: bytes | None = None, ip: str | None = None,
                       method: str = "post", cookie: str | None = None) -> httpx.Response:
            nonlocal n
            n += 1
            headers = {"x-forwarded-for": ip or f"198.51.100.{n % 250}", "content-type": "application/json"}
            if cookie is not None:
                headers["cookie"] = cookie
            content = raw if raw is not None else json.dumps(body).encode()
            if method == "get":
                response = await stack.http.get(path, headers=headers)
            else:
                response = await stack.http.post(path, content=content, headers=headers)
            seen[(path, response.status_code)] = response.status_code
            assert response.status_code == status, (path, status, response.status_code, response.text)
            if status >= 400:
                assert "error" in response.json()
            return response

        try:
            document = (await stack.http.get(f"{API}/openapi.json")).json()
            documented = {(path, int(status)) for path, operations in document["paths"].items()
                          for operation in operations.values() for status in operation["responses"]}

            location = (await stack.add_location("office")).location
            secret = await stack.add_user_with_totp("alice")
            _, laptop = await stack.add_device("alice", "laptop", "office")
            _, phone = await stack.add_device("alice", "phone", "office")
            _, tablet = await stack.add_device("alice", "tablet", "office")
            start, finish, remote, register = (f"{API}/client-mfa/start", f"{API}/client-mfa/finish",
                                               f"{API}/client-mfa/finish-remote", f"{API}/enrollment/register_mobile")
            wrong = str((int(pyotp.TOTP(secret).now()) + 500_000) % 1_000_000).zfill(6)

            def starting(config: rpc.DeviceConfig, method: int = 0) -> dict:
                return {"location_id": location.id, "pubkey": config.pubkey, "method": method}

            # register_mobile
            key = SigningKey.generate()
            registration = {"auth_pub_key": b64(bytes(key.verify_key)), "device_pub_key": phone.pubkey}
            await call(register, 400, registration)  # neither the enrollment cookie nor a code
            await call(register, 403, {**registration, "code": "not-allowed"})
            await call(register, 401, registration, cookie="defguard_proxy=forged")
            phone_code = await stack.allow_mobile("alice", "phone")
            await call(register, 200, {**registration, "code": phone_code})
            tablet_code = await stack.allow_mobile("alice", "tablet")
            await call(register, 409, {**registration, "device_pub_key": tablet.pubkey, "code": tablet_code})
            await call(register, 400, {**registration, "auth_pub_key": "short", "code": tablet_code})

            # start and finish
            token = (await call(start, 200, starting(laptop), ip="203.0.113.1")).json()["token"]
            await call(start, 400, {"location_id": "one"})
            await call(finish, 401, {"token": token, "code": wrong}, ip="203.0.113.1")
            await call(finish, 400, {"token": "unknown", "code": wrong})
            await call(finish, 200, {"token": token, "code": pyotp.TOTP(secret).now()}, ip="203.0.113.1")

            # mobile approve: finish before the phone approved, a bad signature, an approval
            desktop = (await call(start, 200, starting(laptop, 4), ip="203.0.113.2")).json()
            await call(finish, 428, {"token": desktop["token"]}, ip="203.0.113.2")
            approval = {"token": desktop["token"], "auth_pub_key": b64(bytes(key.verify_key))}
            await call(remote, 401, {**approval, "code": b64(key.sign(b"something else").signature)})
            await call(remote, 400, {**approval, "code": None})
            await call(remote, 200, {**approval, "code": b64(key.sign(desktop["challenge"].encode()).signature)})

            # locked for good after mfa_hard_lock_failures (10 here) failures in a row
            for ip in ("203.0.113.3", "203.0.113.4"):
                token = (await call(start, 200, starting(laptop), ip=ip)).json()["token"]
                for _ in range(5):
                    await call(finish, 401, {"token": token, "code": wrong}, ip=ip)
            await call(start, 403, starting(laptop), ip="203.0.113.5")

            for path in (start, finish, remote, register):
                await call(path, 413, raw=b"{" + b" " * 100_000 + b"}")
                for _ in range(40):  # the burst of one address (30), then 429
                    response = await stack.http.post(path, content=b"{}", headers={"x-forwarded-for": "192.0.2.99"})
                    if response.status_code == 429:
                        seen[(path, 429)] = 429
                        break
            await call(f"{API}/health", 200, method="get")

            stack.core.stop()  # the core gone: 503 where a route needs it
            await call(start, 503, starting(tablet))
            await call(finish, 503, {"token": "t", "code": "123456"})
            await call(remote, 503, {"token": "t", "code": "c", "auth_pub_key": "k"})
            await call(register, 503, registration)
        finally:
            await stack.stop()
        # and NATS gone: health says so
        stack = Stack(nats.url, tmp_path / "health")
        await stack.start()
        try:
            nats.stop()

            async def unhealthy() -> bool:
                response = await stack.http.get(f"{API}/health")
                return response.status_code == 503

            await eventually(unhealthy, timeout=30, what="health 503")
            seen[(f"{API}/health", 503)] = 503
        finally:
            await stack.stop()
    exercised = {path for path, _ in seen}
    documented_here = {(path, status) for path, status in documented if path in exercised}
    assert documented_here == set(seen), {"documented, not seen": documented_here - set(seen),
                                          "seen, not documented": set(seen) - documented_here}
    # every route, also those this test does not drive, documents what the edge answers
    for path, operations in document["paths"].items():
        for operation in operations.values():
            statuses = set(operation["responses"])
            assert "422" not in statuses, path
            if path.startswith(API + "/") and path != f"{API}/health":
                assert {"429", "503"} <= statuses, path
            if "requestBody" in operation:
                assert {"400", "413"} <= statuses, path
