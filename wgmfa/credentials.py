"""NATS credentials: one NKey per role, and the nats-server configuration that admits them.

NKeys, not passwords: the server's configuration holds only public keys, and a client
proves its key by signing the server's nonce, so nothing replayable crosses the wire and
nothing in the server's config is a secret. `wgmfa up` keeps every role's seed in
<state dir>/nats-credentials/<role>.nk (directory 0700, files 0600), where each process it
starts, and `wgmfa admin` / `wgmfa events tail` run by the same user, find theirs.

    python -m wgmfa.credentials gateway LOCATION_ID GATEWAY_ID   # admit a gateway (embedded)
    python -m wgmfa.credentials rotate ROLE        # a new seed for a role (embedded)
    python -m wgmfa.credentials deploy [--check]   # (re)generate deploy/nats/*.conf
    python -m wgmfa.credentials env                # fresh NKeys for .env (deploy)
"""
from __future__ import annotations

import argparse
import os
import signal
import sys
from dataclasses import dataclass
from pathlib import Path

import nkeys
from nacl.utils import random

from events import permissions
from events.permissions import FIXED_ROLES
from runtime.settings import BusSettings

REPO = Path(__file__).resolve().parents[1]
DEPLOY_NATS = REPO / "deploy" / "nats"
DEPLOY_GATEWAYS = DEPLOY_NATS / "gateways"
DEPLOY_NODES = ("nats-1", "nats-2", "nats-3")


def new_seed() -> str:
    return nkeys.encode_seed(random(32), nkeys.PREFIX_BYTE_USER).decode()


def public_key(seed: str) -> str:
    return nkeys.from_seed(seed.encode()).public_key.decode()


class BusCredentials:
    """The seeds of every role in one directory, and the authorization they make."""

    def __init__(self, directory: Path) -> None:
        self.directory = Path(directory)

    def path(self, role: str) -> Path:
        return self.directory / f"{role}.nk"

    def _write_new(self, role: str) -> None:
        path = self.path(role)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            return
        with os.fdopen(fd, "w") as handle:
            handle.write(new_seed() + "\n")

    def ensure(self) -> "BusCredentials":
        """Make a seed for every fixed role that has none yet."""
        self.directory.mkdir(parents=True, exist_ok=True)
        os.chmod(self.directory, 0o700)
        for role in FIXED_ROLES:
            self._write_new(role)
        return self

    def add_gateway(self, location_id: int, gateway_id: str) -> str:
        """A credential for one gateway of a location (kept if it exists); its role name."""
        self.ensure()
        role = permissions.gateway_role_name(location_id, gateway_id)
        self._write_new(role)
        return role

    def rotate(self, role: str) -> None:
        """Replace a role's seed; the server admits the new one after a reload."""
        permissions.role(role)  # a role wgmfa knows
        self.path(role).unlink(missing_ok=True)
        self._write_new(role)

    def roles(self) -> list[str]:
        gateways = sorted(p.stem for p in self.directory.glob(f"{permissions.GATEWAY_PREFIX}-*.nk"))
        return [r for r in FIXED_ROLES if self.path(r).exists()] + gateways

    def seed(self, role: str) -> str:
        return self.path(role).read_text().strip()

    def public_key(self, role: str) -> str:
        return public_key(self.seed(role))

    def authorization(self, extra_entries: list[str] | None = None) -> str:
        """The nats-server `authorization` block admitting every role here, each with its
        permissions."""
        users = [(permissions.role(r), self.public_key(r)) for r in self.roles()]
        return permissions.authorization_block(users, extra_entries)


# --- deploy/: generated from the same roles --------------------------------------------------


def env_name(role: str) -> str:
    """The .env variable holding a role's seed (its public key: the same with _PUB)."""
    return "WGMFA_NKEY_" + role.upper().replace("-", "_")


def deploy_gateways(path: Path = DEPLOY_GATEWAYS) -> list[tuple[int, str]]:
    """The gateways the deployment admits: `<location id> <gateway id>` per line."""
    found = []
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            location, gateway_id = line.split()
            found.append((int(location), gateway_id))
    return found


def deploy_roles(gateways: list[tuple[int, str]]) -> list[str]:
    return list(FIXED_ROLES) + [permissions.gateway_role_name(loc, gw) for loc, gw in gateways]


def deploy_authorization(gateways: list[tuple[int, str]]) -> str:
    header = (
        "# Who may do what on the bus. GENERATED from events/permissions.py by\n"
        "# `python -m wgmfa.credentials deploy`; do not edit. Public NKeys come from the\n"
        "# environment (.env: WGMFA_NKEY_<ROLE>_PUB); gateways from deploy/nats/gateways.\n"
    )
    users = [(permissions.role(r), f"${env_name(r)}_PUB") for r in deploy_roles(gateways)]
    return header + permissions.authorization_block(users)


@dataclass(frozen=True)
class NodeLayout:
    """Where a node listens and finds its files; the defaults are compose.yaml's."""

    client_listen: str = "0.0.0.0:4222"
    cluster_listen: str = "0.0.0.0:6222"
    routes: tuple[str, ...] = tuple(f"nats-route://{n}:6222" for n in DEPLOY_NODES)
    cert_dir: str = "/etc/nats/certs"
    store_dir: str = "/data/jetstream"


def deploy_node_config(name: str, layout: NodeLayout = NodeLayout()) -> str:
    """One cluster node: TLS for clients; routes over mutual TLS (a node joins only with a
    certificate of the deployment's CA: that is the route authentication)."""
    cert = f"{layout.cert_dir}/{name}.pem"
    key = f"{layout.cert_dir}/{name}-key.pem"
    ca = f"{layout.cert_dir}/ca.pem"
    routes = "\n".join(f"    {route}" for route in layout.routes)
    return f"""# Node {name} of the three-node JetStream cluster in compose.yaml. GENERATED by
# `python -m wgmfa.credentials deploy`; do not edit. Certificates: deploy/make-certs.sh.
server_name: {name}
listen: {layout.client_listen}
max_payload: 1MB

tls {{
  cert_file: "{cert}"
  key_file: "{key}"
  ca_file: "{ca}"
  timeout: 5
}}

jetstream {{
  store_dir: "{layout.store_dir}"
}}

cluster {{
  name: wgmfa
  listen: {layout.cluster_listen}
  tls {{
    cert_file: "{cert}"
    key_file: "{key}"
    ca_file: "{ca}"
    verify: true
    timeout: 5
  }}
  routes: [
{routes}
  ]
}}

include ./authorization.conf
"""


def deploy_files(gateways: list[tuple[int, str]] | None = None) -> dict[str, str]:
    gateways = deploy_gateways() if gateways is None else gateways
    files = {"authorization.conf": deploy_authorization(gateways)}
    for name in DEPLOY_NODES:
        files[f"{name}.conf"] = deploy_node_config(name)
    return files


def deploy_env(gateways: list[tuple[int, str]] | None = None) -> str:
    """Fresh NKeys for every role of the deployment, as .env lines."""
    gateways = deploy_gateways() if gateways is None else gateways
    lines = []
    for role in deploy_roles(gateways):
        seed = new_seed()
        lines += [f"{env_name(role)}={seed}", f"{env_name(role)}_PUB={public_key(seed)}"]
    return "\n".join(lines) + "\n"


def reload_embedded_server(credentials: BusCredentials, nats_dir: Path) -> bool:
    """Write the embedded server's authorization (where `wgmfa up` keeps it) and make the
    running nats-server reload it; False when none is running."""
    (nats_dir / "authorization.conf").write_text(credentials.authorization())
    for ports in nats_dir.glob("nats-server_*.ports"):
        pid = int(ports.stem.rsplit("_", 1)[1])
        try:
            os.kill(pid, signal.SIGHUP)  # nats-server --signal reload=<pid>
            return True
        except ProcessLookupError:
            continue
    return False


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m wgmfa.credentials")
    sub = parser.add_subparsers(dest="command", required=True)
    gateway = sub.add_parser("gateway", help="admit a gateway of a location to the embedded server (wgmfa up)")
    gateway.add_argument("location_id", type=int)
    gateway.add_argument("gateway_id")
    rotate = sub.add_parser("rotate", help="replace a role's seed on the embedded server (wgmfa up)")
    rotate.add_argument("role", help="core, proxy, reaper, admin, operator or gateway-<location>-<gateway>")
    deploy = sub.add_parser("deploy", help="write deploy/nats/*.conf from events/permissions.py")
    deploy.add_argument("--check", action="store_true", help="only say whether the files are current")
    sub.add_parser("env", help="print fresh NKeys for every role of the deployment (.env lines)")
    args = parser.parse_args(argv)
    if args.command in ("gateway", "rotate"):
        settings = BusSettings()
        state_dir = settings.state_dir.resolve()
        credentials = BusCredentials(settings.nats_credentials_dir or state_dir / "nats-credentials").ensure()
        try:
            if args.command == "gateway":
                role = credentials.add_gateway(args.location_id, args.gateway_id)
            else:
                role = args.role
                credentials.rotate(role)
        except ValueError as exc:
            print(f"wgmfa: {exc}", file=sys.stderr)
            return 2
        running = reload_embedded_server(credentials, state_dir / "nats")
        print(f"{role}: seed in {credentials.path(role)} (give it to the process as WGMFA_NATS_NKEY_FILE or "
              f"WGMFA_NATS_NKEY_SEED); " + ("the running nats-server reloaded its authorization"
                                           if running else "applies when `wgmfa up` starts"))
        return 0
    if args.command == "env":
        sys.stdout.write(deploy_env())
        return 0
    stale = []
    for name, text in deploy_files().items():
        path = DEPLOY_NATS / name
        if not path.exists() or path.read_text() != text:
            stale.append(name)
            if not args.check:
                path.write_text(text)
    if args.check and stale:
        print(f"out of date: {', '.join(stale)} (run python -m wgmfa.credentials deploy)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
