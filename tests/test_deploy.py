"""The distributed deployment: compose.yaml and the NATS cluster deploy/ configures."""
from __future__ import annotations

import asyncio
import signal
import socket
import subprocess
from pathlib import Path

import nats as nats_client
import pyotp
import pytest
import yaml

from events import nats_direct
from events import permissions, streams, subjects
from wgmfa.nats_server import nats_server_binary
from schemas.common import RevokeReason
from schemas.events import PeerRevoked, UserCreated
from tests.support import deploy
from tests.support.deploy import start_deploy_cluster
from tests.support.stack import REPO, Stack, eventually, free_port
from wgmfa import credentials as creds

DEPLOY = REPO / "deploy"


def test_compose_runs_the_embedded_commands_with_other_settings() -> None:
    compose = yaml.safe_load((REPO / "compose.yaml").read_text())
    services = compose["services"]
    assert {"nats-1", "nats-2", "nats-3", "postgres", "core-1", "core-2", "proxy-1", "proxy-2", "reaper-1",
            "reaper-2", "gateway-office-a", "gateway-office-b"} <= set(services)
    for name, service in services.items():
        command = service.get("command") or service.get("entrypoint")
        if command and command[:2] == ["python", "-m"]:
            assert (REPO / command[2] / "__main__.py").exists(), name
            environment = service["environment"]
            assert environment["WGMFA_NATS_URL"].count("tls://") == 3, name
            assert environment["WGMFA_NATS_CA_FILE"] == "/certs/ca.pem", name
        if name.startswith("nats-"):
            assert command == ["nats-server", "-c", f"/etc/nats/{name}.conf"]
    assert services["core-1"]["environment"]["WGMFA_DATABASE_URL"].startswith("postgresql+asyncpg://")
    gateways = [s for n, s in services.items() if n.startswith("gateway-office-")]
    assert len({s["command"][s["command"].index("--gateway-id") + 1] for s in gateways}) == 2
    assert all("NET_ADMIN" in s["cap_add"] for s in gateways)
    assert (DEPLOY / "Dockerfile").exists()


def test_every_service_in_compose_serves_its_metrics_to_the_compose_network() -> None:
    services = yaml.safe_load((REPO / "compose.yaml").read_text())["services"]
    port_setting = {"core_service": "WGMFA_CORE_METRICS_PORT", "proxy_service": "WGMFA_METRICS_PORT",
                    "reaper_worker": "WGMFA_REAPER_METRICS_PORT", "gateway_worker": "WGMFA_GATEWAY_METRICS_PORT"}
    served = set()
    for name, service in services.items():
        command = service.get("command") or []
        if command[:2] != ["python", "-m"]:
            continue
        environment = service["environment"]
        port = environment[port_setting[command[2]]]
        assert environment["WGMFA_METRICS_HOST"] == "0.0.0.0", name  # reachable from the network, not the host
        assert port in service["expose"] and not any(p.split(":")[-1] == port for p in service.get("ports", [])), name
        served.add(command[2])
    assert served == set(port_setting)


def test_every_process_in_compose_has_the_nkey_of_its_own_role() -> None:
    """Each service gets its role's seed from .env, and every node every role's public key."""
    services = yaml.safe_load((REPO / "compose.yaml").read_text())["services"]
    expected = {"core-1": permissions.CORE, "core-2": permissions.CORE, "proxy-1": permissions.PROXY,
                "proxy-2": permissions.PROXY, "reaper-1": permissions.REAPER, "reaper-2": permissions.REAPER,
                "admin": permissions.ADMIN, "events": permissions.OPERATOR}
    for location, gateway_id in creds.deploy_gateways():
        expected[f"gateway-office-{gateway_id.rsplit('-', 1)[1]}"] = permissions.gateway_role_name(location, gateway_id)
    for name, role in expected.items():
        seed = services[name]["environment"]["WGMFA_NATS_NKEY_SEED"]
        assert seed.startswith("${" + creds.env_name(role) + ":?") or seed == "${" + creds.env_name(role) + "}", name
    env_example = (DEPLOY / "env.example").read_text()
    for role in creds.deploy_roles(creds.deploy_gateways()):
        assert f"{creds.env_name(role)}=" in env_example and f"{creds.env_name(role)}_PUB=" in env_example
        for node in ("nats-1", "nats-2", "nats-3"):
            assert f"{creds.env_name(role)}_PUB" in services[node]["environment"], (node, role)


async def test_a_three_node_cluster_with_replicated_streams_survives_a_node(tmp_path: Path) -> None:
    """deploy/'s cluster (TLS, authenticated routes, every service in its role) loses a node
    and logins go on."""
    cluster = start_deploy_cluster(tmp_path / "cluster")
    credentials = cluster.write_credentials(tmp_path / "credentials")
    stack = Stack(cluster.url, tmp_path / "stack", stream_replicas="3", rate_limit_per_s="0",
                  nats_credentials_dir=str(credentials), nats_ca_file=str(cluster.ca_file))
    try:
        await stack.start()
        bus = await stack.connect(permissions.CORE)
        info = await nats_direct.jetstream(bus.broker, 5).stream_info("WGMFA_PEERS")
        assert info.config.num_replicas == 3 and len(info.cluster.replicas or []) == 2
        await bus.close()

        location = await stack.add_location("hq")
        secret = await stack.add_user_with_totp("alice")
        _, device = await stack.add_device("alice", "laptop", "hq")
        cluster.processes[0].kill()  # one node of three gone: quorum stays, clients move to the others
        body = {"location_id": location.location.id, "pubkey": device.pubkey, "method": 0}

        async def started() -> str | None:
            response = await stack.http.post("/api/v1/client-mfa/start", json=body)
            if response.status_code == 503:
                return None  # a service is still moving to another node
            assert response.status_code == 200, response.text
            return response.json()["token"]

        token = await eventually(started, timeout=30, interval=0.5, what="the services to reconnect")

        async def finished() -> bool:  # a client retries a 503 with the same token
            response = await stack.http.post("/api/v1/client-mfa/finish", json={"token": token, "code": pyotp.TOTP(secret).now()})
            assert response.status_code in (200, 503), response.text
            return response.status_code == 200

        await eventually(finished, timeout=30, interval=0.5, what="the login to finish")
    finally:
        await stack.stop()
        cluster.stop()


async def test_a_node_without_the_deployments_certificate_cannot_join_the_cluster(tmp_path: Path) -> None:
    """Route authentication: the nodes accept routes only with a certificate of their CA."""
    cluster = start_deploy_cluster(tmp_path / "cluster")
    rogue_certs = tmp_path / "rogue-certs"
    subprocess.run([str(DEPLOY / "make-certs.sh"), str(rogue_certs), "rogue"], check=True, capture_output=True)
    routes = [line.split()[0] for line in (tmp_path / "cluster" / "nats-1" / "nats.conf").read_text().splitlines()
              if line.strip().startswith("nats-route://")]
    rogue_port = free_port()
    config = tmp_path / "rogue.conf"
    config.write_text(
        f"listen: 127.0.0.1:{rogue_port}\n"
        f"cluster {{\n  name: wgmfa\n  listen: 127.0.0.1:{free_port()}\n"
        f'  tls {{ cert_file: "{rogue_certs}/rogue.pem", key_file: "{rogue_certs}/rogue-key.pem", '
        f'ca_file: "{rogue_certs}/ca.pem", verify: true }}\n'
        f"  routes: [{', '.join(routes)}]\n}}\n"
    )
    rogue = subprocess.Popen([nats_server_binary(), "-c", str(config)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    core = None
    listener = None
    try:
        core = await cluster.connect(permissions.CORE)
        await core.ensure_streams(3)

        async def refused_in_logs() -> bool:
            logs = "".join((tmp_path / "cluster" / n / "nats.log").read_text(errors="replace") for n in creds.DEPLOY_NODES)
            return "tls route handshake error" in logs.lower()

        await eventually(refused_in_logs, timeout=15, interval=0.2, what="the nodes to refuse the rogue route")
        listener = await nats_client.connect(f"nats://127.0.0.1:{rogue_port}")
        heard = await listener.subscribe(">")
        await listener.flush()
        await core.publish_event(UserCreated(user_id=1, username="alice"))
        await nats_direct.client(core.broker).publish(subjects.notify_login("x"), b"{}")
        await nats_direct.client(core.broker).flush()
        assert not [m async for m in _drain(heard)], "a message crossed to the rogue node"
    finally:
        if listener is not None:
            await listener.close()
        if core is not None:
            await core.close()
        rogue.terminate()
        rogue.wait(10)
        cluster.stop()


async def _drain(sub):  # type: ignore[no-untyped-def]
    while True:
        try:
            yield await sub.next_msg(timeout=1)
        except (asyncio.TimeoutError, Exception):
            return


async def test_the_test_cluster_starts_again_when_a_node_cannot_bind_its_port(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A port picked free can be taken before its node binds it. Such a node exits, and a
    cluster that misses a node at its first start never elects a JetStream leader: the
    cluster is started again on other ports."""
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    ports = iter([taken.getsockname()[1]])
    monkeypatch.setattr(deploy, "free_port", lambda: next(ports, None) or free_port())
    cluster = start_deploy_cluster(tmp_path / "cluster")
    core = None
    try:
        assert all(process.poll() is None for process in cluster.processes)
        assert str(taken.getsockname()[1]) not in cluster.url
        core = await cluster.connect(permissions.CORE)
        await core.ensure_streams(3, wait_s=30)
    finally:
        if core is not None:
            await core.close()
        cluster.stop()
        taken.close()


async def test_a_service_starting_while_the_cluster_has_no_quorum_serves_once_it_is_back(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A durable consumer cannot be made while two nodes of three are away: the service
    waits for them and then serves, rather than failing its start."""
    cluster = start_deploy_cluster(tmp_path / "cluster")
    core = await cluster.connect(permissions.CORE, node=0)
    away = cluster.processes[1:]
    handled: list[PeerRevoked] = []
    try:
        await core.ensure_streams(3)

        async def handle(state: PeerRevoked) -> None:
            handled.append(state)

        durables = core.stream_router()
        durables.consumer(handle, stream=streams.PEERS.name, durable="core-peers", filter_subject=subjects.PEER_ALL)
        for process in away:
            process.send_signal(signal.SIGSTOP)
        caplog.clear()
        serving = asyncio.create_task(core.serve(durables))
        await eventually(lambda: "waiting for JetStream" in caplog.text or serving.done(),
                         timeout=30, what="a request for the consumer to go unanswered")
        for process in away:
            process.send_signal(signal.SIGCONT)
        await asyncio.wait_for(serving, 60)
        state = PeerRevoked(location_id=1, device_id=7, generation=1, pubkey="k7", reason=RevokeReason.IDLE)
        await nats_direct.jetstream(core.broker, 10).publish(subjects.peer(1, 7), state.model_dump_json().encode())
        await eventually(lambda: handled, timeout=15, what="the consumer to be served")
        assert handled == [state]
    finally:
        for process in away:
            process.send_signal(signal.SIGCONT)
        await core.close()
        cluster.stop()
