"""The distributed deployment: compose.yaml, the NATS cluster and its permissions."""
from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import nats
import nats.errors
import pyotp
import pytest
import yaml

from events import subjects
from events.bus import Bus, BusUnavailable
from events.server import NatsServer, nats_server_binary
from schemas import rpc
from tests.support.stack import REPO, Stack, eventually, free_port, read_stream

DEPLOY = REPO / "deploy"
PASSWORDS = {"WGMFA_NATS_SERVICE_PASSWORD": "service-secret", "WGMFA_NATS_OPERATOR_PASSWORD": "operator-secret"}


def test_compose_runs_the_embedded_commands_with_other_settings() -> None:
    compose = yaml.safe_load((REPO / "compose.yaml").read_text())
    services = compose["services"]
    assert {"nats-1", "nats-2", "nats-3", "postgres", "core-1", "core-2", "proxy-1", "proxy-2", "reaper-1",
            "reaper-2", "gateway-office-a", "gateway-office-b"} <= set(services)
    for name, service in services.items():
        command = service.get("command") or service.get("entrypoint")
        if command and command[:2] == ["python", "-m"]:
            assert (REPO / command[2] / "__main__.py").exists(), name
            assert service["environment"]["WGMFA_NATS_URL"].count("nats://service:") == 3, name
        if name.startswith("nats-"):
            assert command == ["nats-server", "-c", f"/etc/nats/{name}.conf"]
    assert services["core-1"]["environment"]["WGMFA_DATABASE_URL"].startswith("postgresql+asyncpg://")
    gateways = [s for n, s in services.items() if n.startswith("gateway-office-")]
    assert len({s["command"][s["command"].index("--gateway-id") + 1] for s in gateways}) == 2
    assert all("NET_ADMIN" in s["cap_add"] for s in gateways)
    assert (DEPLOY / "Dockerfile").exists()


@pytest.mark.parametrize("node", [1, 2, 3])
def test_cluster_node_configs_are_valid(node: int, tmp_path: Path) -> None:
    shutil.copytree(DEPLOY / "nats", tmp_path / "nats")
    result = subprocess.run([nats_server_binary(), "-t", "-c", str(tmp_path / "nats" / f"nats-{node}.conf")],
                            capture_output=True, text=True, env={**os.environ, **PASSWORDS})
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.fixture
def secured_nats(tmp_path: Path) -> Iterator[tuple[NatsServer, int]]:
    shutil.copy(DEPLOY / "nats" / "authorization.conf", tmp_path / "authorization.conf")
    os.environ.update(PASSWORDS)
    server = NatsServer(tmp_path, extra_config="include ./authorization.conf")  # relative to the config file
    server.start()
    yield server, int(server.url.rsplit(":", 1)[1])
    server.stop()
    for key in PASSWORDS:
        os.environ.pop(key, None)


async def test_operators_read_events_but_cannot_call_services(secured_nats: tuple[NatsServer, int]) -> None:
    _, port = secured_nats
    service = await Bus.connect(f"nats://service:service-secret@127.0.0.1:{port}", "svc", wait_s=5)
    await service.ensure_streams()
    from schemas.events import UserCreated

    await service.publish_event(UserCreated(user_id=1, username="alice"))

    operator = await Bus.connect(f"nats://operator:operator-secret@127.0.0.1:{port}", "ops", wait_s=5,
                                 inbox_prefix="_INBOX_operator")
    try:
        assert [e["username"] for e in await read_stream(operator, subjects.EVENTS_ALL)] == ["alice"]
        with pytest.raises(BusUnavailable):  # the request is refused (no reply arrives)
            await operator.request(subjects.RPC_CORE_HELLO, rpc.CoreHello(), timeout=1)
        errors: list[Exception] = []

        async def note(error: Exception) -> None:
            errors.append(error)

        spy = await nats.connect(f"nats://operator:operator-secret@127.0.0.1:{port}", error_cb=note)
        await spy.subscribe("_INBOX.>")
        await spy.subscribe(subjects.RPC_ALL)
        await spy.flush()
        await asyncio.sleep(0.3)
        assert sum("permissions violation for subscription" in str(e).lower() for e in errors) == 2
        await spy.close()
    finally:
        await operator.close()
        await service.close()
    with pytest.raises(BusUnavailable):
        await Bus.connect(f"nats://operator:wrong@127.0.0.1:{port}", "ops", wait_s=1)


async def test_a_three_node_cluster_with_replicated_streams_survives_a_node(tmp_path: Path) -> None:
    client_ports = [free_port() for _ in range(3)]
    cluster_ports = [free_port() for _ in range(3)]
    routes = ", ".join(f"nats-route://127.0.0.1:{p}" for p in cluster_ports)
    nodes = [
        NatsServer(tmp_path / f"n{i}", port=client_ports[i],
                   extra_config=f"server_name: n{i}\ncluster {{ name: wgmfa, listen: 127.0.0.1:{cluster_ports[i]}, routes: [{routes}] }}")
        for i in range(3)
    ]
    for node in nodes:
        node.start()
    url = ",".join(f"nats://127.0.0.1:{p}" for p in client_ports)
    stack = Stack(url, tmp_path / "stack", stream_replicas="3", rate_limit_per_s="0")
    try:
        await stack.start()
        bus = await Bus.connect(url, "test", wait_s=10)
        info = await bus.js.stream_info("WGMFA_PEERS")
        assert info.config.num_replicas == 3 and len(info.cluster.replicas or []) == 2
        await bus.close()

        location = await stack.add_location("hq")
        secret = await stack.add_user_with_totp("alice")
        _, device = await stack.add_device("alice", "laptop", "hq")
        nodes[0].kill()  # one node of three gone: quorum stays, clients move to the others
        body = {"location_id": location.location.id, "pubkey": device.pubkey, "method": 0}

        async def started() -> str | None:
            response = await stack.http.post("/api/v1/client-mfa/start", json=body)
            if response.status_code == 503:
                return None  # a service is still moving to another node
            assert response.status_code == 200, response.text
            return response.json()["token"]

        token = await eventually(started, timeout=20, interval=0.5, what="the services to reconnect")

        async def finished() -> bool:  # a client retries a 503 with the same token
            response = await stack.http.post("/api/v1/client-mfa/finish", json={"token": token, "code": pyotp.TOTP(secret).now()})
            assert response.status_code in (200, 503), response.text
            return response.status_code == 200

        await eventually(finished, timeout=20, interval=0.5, what="the login to finish")
    finally:
        await stack.stop()
        for node in nodes:
            node.stop()
