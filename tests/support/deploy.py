"""deploy/'s NATS configuration, run for real on this machine: a three-node cluster with
TLS, mutually authenticated routes and every role's NKey, as compose.yaml runs it."""
from __future__ import annotations

import os
import ssl
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

import nats

from events import permissions
from events.bus import Bus
from wgmfa.nats_server import nats_server_binary
from tests.support.stack import REPO, free_port
from wgmfa import credentials as creds


@dataclass
class Bed:
    """A server (or cluster) with wgmfa's roles, and a way to connect as each."""

    kind: str
    url: str  # for the roles
    seeds: dict[str, str]
    ca_file: Path | None = None
    processes: list[subprocess.Popen[bytes]] = field(default_factory=list)

    async def connect(self, role: str) -> Bus:
        return await Bus.connect(self.url, f"test-{role}", wait_s=20, nkey_seed=self.seeds[role],
                                 inbox_prefix=permissions.inbox_prefix(role), ca_file=self.ca_file)

    def write_credentials(self, directory: Path) -> Path:
        """Every role's seed as <role>.nk, the layout services look for (WGMFA_NATS_CREDENTIALS_DIR)."""
        directory.mkdir(parents=True, exist_ok=True)
        for role, seed in self.seeds.items():
            (directory / f"{role}.nk").write_text(seed + "\n")
        return directory

    def stop(self) -> None:
        for process in self.processes:
            if process.poll() is None:
                process.terminate()
                process.wait(10)

    async def raw(self, role: str | None, errors: list[str], seed: str | None = None) -> nats.NATS:
        """A bare connection that records the server's permission errors."""

        async def note(error: Exception) -> None:
            errors.append(str(error).lower())

        options: dict = {"error_cb": note, "allow_reconnect": False, "connect_timeout": 3}
        if role is not None or seed is not None:
            options["nkeys_seed_str"] = seed or self.seeds[role]  # type: ignore[index]
        if role is not None:
            options["inbox_prefix"] = permissions.inbox_prefix(role)
        if self.ca_file is not None:
            options["tls"] = ssl.create_default_context(cafile=str(self.ca_file))
        return await nats.connect(servers=self.url.split(","), **options)


def start_deploy_cluster(work: Path) -> Bed:
    """deploy/'s generated configuration on three local nodes, with certificates made by
    deploy/make-certs.sh and NKeys as `python -m wgmfa.credentials env` makes them."""
    certs = work / "certs"
    subprocess.run([str(REPO / "deploy" / "make-certs.sh"), str(certs)], check=True, capture_output=True)
    gateways = creds.deploy_gateways()
    env_lines = creds.deploy_env(gateways).splitlines()
    env = dict(line.split("=", 1) for line in env_lines)
    client_ports = [free_port() for _ in creds.DEPLOY_NODES]
    cluster_ports = [free_port() for _ in creds.DEPLOY_NODES]
    routes = tuple(f"nats-route://127.0.0.1:{p}" for p in cluster_ports)
    files = creds.deploy_files(gateways)
    processes = []
    for index, name in enumerate(creds.DEPLOY_NODES):
        node_dir = work / name
        node_dir.mkdir()
        layout = creds.NodeLayout(client_listen=f"127.0.0.1:{client_ports[index]}",
                                  cluster_listen=f"127.0.0.1:{cluster_ports[index]}", routes=routes,
                                  cert_dir=str(certs), store_dir=str(node_dir / "jetstream"))
        (node_dir / "authorization.conf").write_text(files["authorization.conf"])
        (node_dir / "nats.conf").write_text(creds.deploy_node_config(name, layout))
        log = open(node_dir / "nats.log", "wb")
        processes.append(subprocess.Popen([nats_server_binary(), "-c", str(node_dir / "nats.conf")],
                                          env={**os.environ, **env}, stdout=log, stderr=subprocess.STDOUT))
        log.close()
    seeds = {role: env[creds.env_name(role)] for role in creds.deploy_roles(gateways)}
    url = ",".join(f"tls://127.0.0.1:{p}" for p in client_ports)
    return Bed("deploy", url, seeds, ca_file=certs / "ca.pem", processes=processes)
