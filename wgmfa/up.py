"""`wgmfa up`: the whole system on embedded defaults, each service a supervised child.

nats-server (JetStream, store under the state directory), the core on SQLite, the proxy,
the reaper, and (as root) one userspace WireGuard gateway for the first location, started
as soon as that location exists. A child that dies is restarted with a growing delay.

`up` owns its children: Ctrl-C, SIGTERM, SIGHUP (the terminal closed), `wgmfa down` or a
stdout nobody reads any more stop everything in order, and should `up` itself be killed
outright, the kernel stops every child (parent-death signal). One `up` per state
directory: a second one refuses.
"""
from __future__ import annotations

import argparse
import asyncio
import errno
import fcntl
import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field

import httpx

from events import permissions, subjects
from events.bus import Bus, BusUnavailable
from schemas.sealing import ReplyKey
from wgmfa.nats_server import NatsServer, NatsServerError, tie_to_parent
from runtime.settings import BusSettings, load_settings
from schemas import rpc
from gateway_worker.settings import default_gateway_id
from wgmfa.credentials import BusCredentials
from wgmfa.output import fail

MAX_BACKOFF_S = 30.0
STOP_TIMEOUT_S = 10.0
LOCK_FILE = "up.lock"
IFNAMSIZ = 15


class Output:
    """up's own messages. A stdout or stderr that went away (`wgmfa up | head`, a closed
    terminal) is not a crash: it is noted, the output goes to /dev/null, and up stops."""

    lost = False

    @classmethod
    def say(cls, message: str, *, error: bool = False) -> None:
        stream = sys.stderr if error else sys.stdout
        try:
            print(message, file=stream, flush=True)
        except OSError:  # EPIPE from a pipe, EIO from a terminal that closed
            cls.lost = True
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, stream.fileno())
            os.close(devnull)


def say(message: str, *, error: bool = False) -> None:
    Output.say(message, error=error)


def interface_name(state_dir: os.PathLike[str] | str, location_id: int) -> str:
    """The embedded gateway's interface: unique to the state directory, so that `up`
    never takes over (or, stopping, removes) an interface some other deployment made."""
    digest = hashlib.sha256(os.fsencode(os.path.realpath(state_dir))).hexdigest()
    suffix = str(location_id)
    return f"wgm{digest[:IFNAMSIZ - 3 - len(suffix) - 1]}-{suffix}"


class StateLock:
    """`<state dir>/up.lock`, locked (flock) for as long as an `up` runs there, with its
    process id inside."""

    def __init__(self, state_dir: os.PathLike[str] | str) -> None:
        self.path = os.path.join(state_dir, LOCK_FILE)
        self.fd: int | None = None

    def acquire(self) -> int | None:
        """None when taken; else the pid of the `up` holding it (0 if unknown)."""
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise
            holder = self.holder_pid(fd)
            os.close(fd)
            return holder
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self.fd = fd
        return None

    @staticmethod
    def holder_pid(fd: int) -> int:
        try:
            return int(os.pread(fd, 32, 0).decode().strip() or 0)
        except ValueError:
            return 0

    def held_by(self) -> int | None:
        """The pid of the running `up`, or None when none runs on this state directory."""
        try:
            fd = os.open(self.path, os.O_RDONLY)
        except FileNotFoundError:
            return None
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError:
            return self.holder_pid(fd)
        finally:
            os.close(fd)
        return None


class UpSettings(BusSettings):
    nats_port: int = 4222
    proxy_host: str = "127.0.0.1"
    proxy_port: int = 8080
    smtp_host: str | None = None
    """A real SMTP server for emailed codes; without one, `up` runs a local sink."""
    smtp_sink_port: int = 2525
    """Port of the local SMTP sink (127.0.0.1) that keeps mails under <state dir>/mail."""

    @property
    def runs_sink(self) -> bool:
        return self.smtp_host is None


@dataclass
class Child:
    name: str
    argv: list[str]
    env: dict[str, str]
    process: subprocess.Popen[bytes] | None = None
    failures: int = 0
    restart_at: float = 0.0
    started_at: float = field(default=0.0)

    def start(self) -> None:
        # its own session, so that Ctrl-C reaches up alone and the stop is in order; tied
        # to up, so that it never outlives it
        self.process = subprocess.Popen(self.argv, env=self.env, start_new_session=True, preexec_fn=tie_to_parent)
        self.started_at = time.monotonic()

    def exited(self) -> int | None:
        return None if self.process is None else self.process.poll()

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)

    def wait_or_kill(self, deadline: float) -> None:
        if self.process is None:
            return
        try:
            self.process.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            say(f"wgmfa: {self.name} did not stop in time; killing it", error=True)
            self.process.kill()
            self.process.wait()


def port_free(host: str, port: int) -> bool:
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


async def connect_as_admin(url: str, seed: str, wait_s: float) -> Bus:
    return await Bus.connect(url, "wgmfa-up", wait_s=wait_s, nkey_seed=seed,
                             inbox_prefix=permissions.inbox_prefix(permissions.ADMIN))


async def wait_for_core(url: str, seed: str, timeout_s: float) -> str:
    bus = await connect_as_admin(url, seed, timeout_s)
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                hello = await bus.call(subjects.RPC_CORE_HELLO, rpc.CoreHello(), rpc.CoreHelloResult, timeout=2)
                return hello.version
            except BusUnavailable:
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.2)
    finally:
        await bus.close()


async def first_location_credentials(url: str, seed: str) -> dict | None:
    """The gateway credentials of the location with the lowest id, if any exists."""
    bus = await connect_as_admin(url, seed, 5)
    try:
        locations = await bus.call(subjects.admin_rpc("location_list"), rpc.Empty(), rpc.LocationListResult, timeout=5)
        if not locations.locations:
            return None
        reply = ReplyKey()
        result = await bus.call(
            subjects.admin_rpc("gateway_credentials"),
            rpc.GatewayCredentialsRequest(location=str(locations.locations[0].id), reply_key=reply.public),
            rpc.GatewayCredentialsResult,
            timeout=5,
        )
        return json.loads(reply.open(result.credentials_sealed))
    finally:
        await bus.close()


def wait_for_http(url: str, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if httpx.get(url, timeout=1).status_code == 200:
                return True
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    return False


class Supervisor:
    def __init__(self, settings: UpSettings) -> None:
        self.settings = settings
        self.state_dir = settings.state_dir.resolve()
        self.nats = NatsServer(self.state_dir / "nats", port=settings.nats_port, log_file=self.state_dir / "nats-server.log",
                               die_with_parent=True)
        self.bus_credentials = BusCredentials(settings.nats_credentials_dir or self.state_dir / "nats-credentials")
        self.lock = StateLock(self.state_dir)
        self.stopped = False
        self.children: list[Child] = []
        self.stopping = False
        self.gateway_started = False
        self.next_location_check = 0.0

    def child_env(self) -> dict[str, str]:
        env = dict(os.environ)
        env.update(
            WGMFA_NATS_URL=self.nats.url,
            WGMFA_STATE_DIR=str(self.state_dir),
            WGMFA_PROXY_HOST=self.settings.proxy_host,
            WGMFA_PROXY_PORT=str(self.settings.proxy_port),
            PYTHONUNBUFFERED="1",
        )
        if self.settings.runs_sink:
            env.update(WGMFA_SMTP_HOST="127.0.0.1", WGMFA_SMTP_PORT=str(self.settings.smtp_sink_port),
                       WGMFA_SMTP_SECURITY="none")
        return env

    def plan(self) -> list[Child]:
        env = self.child_env()
        python = sys.executable
        sink = [
            Child("smtp-sink", [python, "-m", "wgmfa.smtp_sink", "--dir", str(self.state_dir / "mail"),
                                "--port", str(self.settings.smtp_sink_port)], env)
        ] if self.settings.runs_sink else []
        return sink + [
            Child("core", [python, "-m", "core_service"], env),
            Child("proxy", [python, "-m", "proxy_service"], env),
            Child("reaper", [python, "-m", "reaper_worker"], env),
        ]

    def gateway_blocker(self) -> str | None:
        """Why this machine cannot run the embedded gateway, or None."""
        if os.geteuid() != 0:
            return "userspace WireGuard needs root (CAP_NET_ADMIN and /dev/net/tun); run `wgmfa up` as root"
        if shutil.which("wireguard-go") is None:
            return "wireguard-go is not installed (scripts/install.sh installs it)"
        if not os.path.exists("/dev/net/tun"):
            return "/dev/net/tun is missing"
        return None

    def start_gateway_when_a_location_exists(self) -> None:
        """The embedded gateway serves the first location; until one exists, look again."""
        if self.gateway_started or self.stopping or time.monotonic() < self.next_location_check:
            return
        self.next_location_check = time.monotonic() + 2.0
        try:
            credentials = asyncio.run(first_location_credentials(self.nats.url, self.bus_credentials.seed(permissions.ADMIN)))
        except Exception as exc:
            say(f"wgmfa: looking for a location: {exc}", error=True)
            return
        if credentials is None:
            return
        path = self.state_dir / f"gateway-{credentials['location_id']}.json"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as handle:
            json.dump(credentials, handle)
        # its own NATS role, admitted by a configuration reload (no restart)
        gateway_id = default_gateway_id()
        interface = interface_name(self.state_dir, credentials["location_id"])
        self.bus_credentials.add_gateway(credentials["location_id"], gateway_id)
        self.nats.reload(self.bus_credentials.authorization())
        gateway = Child(
            "gateway",
            [sys.executable, "-m", "gateway_worker", "--credentials", str(path), "--backend", "userspace",
             "--gateway-id", gateway_id, "--interface", interface, "--remove-interface-on-exit"],
            self.child_env(),
        )
        gateway.start()
        self.children.append(gateway)
        self.gateway_started = True
        say(
            f"wgmfa: gateway for location {credentials['location_name']} started on interface "
            f"{interface} (port {credentials['listen_port']})"
        )

    def run(self) -> int:
        self.state_dir.mkdir(parents=True, exist_ok=True)
        os.chmod(self.state_dir, 0o700)
        holder = self.lock.acquire()
        if holder is not None:
            return fail(
                f"wgmfa is already up on {self.state_dir}"
                f"{f' (process {holder})' if holder else ''}; `wgmfa down` stops it"
            )
        for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            signal.signal(signum, self._on_signal)
        try:
            return self._run()
        finally:
            self.shutdown()

    def _run(self) -> int:
        s = self.settings
        if not port_free("127.0.0.1", s.nats_port):
            return fail(f"port {s.nats_port} is in use (is wgmfa already up? set WGMFA_NATS_PORT)")
        if not port_free(s.proxy_host, s.proxy_port):
            return fail(f"port {s.proxy_port} on {s.proxy_host} is in use (set WGMFA_PROXY_PORT)")
        if s.runs_sink and not port_free("127.0.0.1", s.smtp_sink_port):
            return fail(f"port {s.smtp_sink_port} is in use (set WGMFA_SMTP_SINK_PORT, or WGMFA_SMTP_HOST for a real server)")
        self.nats.authorization = self.bus_credentials.ensure().authorization()
        try:
            self.nats.start()
        except NatsServerError as exc:
            return fail(str(exc))
        say(f"wgmfa: nats-server with JetStream at {self.nats.url} (store {self.nats.data_dir})")
        self.children = self.plan()
        for child in self.children:
            child.start()
        try:
            version = asyncio.run(wait_for_core(self.nats.url, self.bus_credentials.seed(permissions.ADMIN), 60))
        except BusUnavailable as exc:
            self.shutdown()
            return fail(f"the core did not start: {exc}")
        if self.stopping:
            return 0
        proxy_url = f"http://{s.proxy_host}:{s.proxy_port}"
        if not wait_for_http(f"{proxy_url}/api/v1/health", 30):
            say("wgmfa: the proxy is not answering yet; see its log above", error=True)
        blocker = self.gateway_blocker()
        self.banner(version, proxy_url, blocker)
        if blocker is not None:
            self.gateway_started = True  # never: say why once, and run the rest
        return self.supervise()

    def banner(self, version: str, proxy_url: str, gateway_blocker: str | None) -> None:
        gateway = (
            f"not started: {gateway_blocker}" if gateway_blocker
            else "starts for the first location as soon as it exists"
        )
        say(
            f"\nwgmfa {version} is up. State in {self.state_dir}\n"
            f"  proxy   {proxy_url}/api/v1/client-mfa/start\n"
            f"  NATS    {self.nats.url}\n"
            f"  reaper  running\n"
            f"  mail    {self.mail_line()}\n"
            f"  metrics {self.metrics_line()}\n"
            f"  gateway {gateway}\n"
            f"From another terminal (after `. .venv/bin/activate`):\n"
            f"  wgmfa admin location add office --endpoint 192.0.2.1:51820 --network 10.10.0.0/24 --mfa internal\n"
            f"  wgmfa events tail\n"
            f"Ctrl-C (or `wgmfa down`) stops everything.\n"
        )

    def metrics_line(self) -> str:
        """Where the services' /metrics are served: the ports set in the environment
        (`up` passes it on to them)."""
        ports = {name: os.environ.get(variable) for name, variable in (
            ("core", "WGMFA_CORE_METRICS_PORT"), ("proxy", "WGMFA_METRICS_PORT"), ("reaper", "WGMFA_REAPER_METRICS_PORT"),
            ("gateway", "WGMFA_GATEWAY_METRICS_PORT"))}
        served = [f"{name} http://{self.settings.metrics_host}:{port}/metrics" for name, port in ports.items() if port]
        return ", ".join(served) or "off (set WGMFA_CORE_METRICS_PORT, WGMFA_METRICS_PORT, WGMFA_REAPER_METRICS_PORT, ...)"

    def mail_line(self) -> str:
        if self.settings.runs_sink:
            return f"emailed codes are kept in {self.state_dir / 'mail'} (SMTP sink on 127.0.0.1:{self.settings.smtp_sink_port})"
        return f"sent through {self.settings.smtp_host}"

    def _on_signal(self, _signum: int, _frame: object) -> None:
        self.stopping = True

    def supervise(self) -> int:
        while not self.stopping and not Output.lost:
            time.sleep(0.3)
            self.start_gateway_when_a_location_exists()
            if self.nats.process is not None and self.nats.process.poll() is not None and not self.stopping:
                say("wgmfa: nats-server exited; restarting it", error=True)
                try:
                    # read again: gateways admitted from elsewhere (`wgmfa.credentials gateway`)
                    self.nats.authorization = self.bus_credentials.authorization()
                    self.nats.start()
                except NatsServerError as exc:
                    say(f"wgmfa: {exc}", error=True)
            now = time.monotonic()
            for child in self.children:
                code = child.exited()
                if code is None or self.stopping:
                    continue
                if child.restart_at == 0.0:
                    # quick deaths count against the backoff; a long healthy run resets it
                    child.failures = child.failures + 1 if now - child.started_at < 60 else 1
                    delay = min(2.0 ** (child.failures - 1), MAX_BACKOFF_S)
                    child.restart_at = now + delay
                    say(f"wgmfa: {child.name} exited with code {code}; restarting in {delay:g} s", error=True)
                elif now >= child.restart_at:
                    child.restart_at = 0.0
                    child.start()
        self.shutdown()
        return 0

    def shutdown(self) -> None:
        """Stop every child and nats-server, once; nothing to do if nothing started."""
        if self.stopped or (self.nats.process is None and not self.children):
            return
        self.stopped = True
        self.stopping = True
        say("\nwgmfa: stopping")
        for child in reversed(self.children):
            child.stop()
        deadline = time.monotonic() + STOP_TIMEOUT_S
        for child in reversed(self.children):
            child.wait_or_kill(deadline)
        self.nats.stop()
        say("wgmfa: stopped")


def up(_args: argparse.Namespace) -> int:
    return Supervisor(load_settings(UpSettings)).run()


def down(args: argparse.Namespace) -> int:
    """Stop the `up` running on the state directory, and wait until it has stopped."""
    state_dir = load_settings(UpSettings).state_dir.resolve()
    lock = StateLock(state_dir)
    pid = lock.held_by()
    if pid is None:
        return fail(f"wgmfa is not up on {state_dir}")
    if not pid:
        return fail(f"wgmfa is up on {state_dir}, but {lock.path} does not say which process it is")
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return fail(f"wgmfa (process {pid}) is gone already")
    except PermissionError:
        return fail(f"not allowed to stop wgmfa (process {pid}): run `wgmfa down` as the user that ran `wgmfa up`")
    deadline = time.monotonic() + args.timeout
    while lock.held_by() is not None:
        if time.monotonic() > deadline:
            return fail(f"wgmfa (process {pid}) did not stop within {args.timeout:g} s")
        time.sleep(0.2)
    print(f"wgmfa: stopped the wgmfa that was up on {state_dir}")
    return 0


def add_parser(subparsers: argparse._SubParsersAction, _json_flag: argparse.ArgumentParser) -> None:
    p = subparsers.add_parser("up", help="start the whole system on embedded defaults (Ctrl-C or `wgmfa down` stops it)")
    p.set_defaults(run=up, sync=True)
    p = subparsers.add_parser("down", help="stop the `wgmfa up` running on the state directory")
    p.add_argument("--timeout", type=float, default=30.0, help="seconds to wait for it to stop (default 30)")
    p.set_defaults(run=down, sync=True)
