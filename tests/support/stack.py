"""Run wgmfa's services as real processes for end-to-end tests, and talk to them the way
clients and operators do."""
from __future__ import annotations

import asyncio
import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from datetime import timedelta
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pyotp

from events import nats_direct
from events import permissions, subjects
from events.bus import Bus, BusUnavailable
from schemas.sealing import generate_keypair
from wgmfa.nats_server import NatsServer
from runtime.settings import BusSettings
from schemas import rpc
from schemas.common import utcnow
from wgmfa.admin import AdminClient
from wgmfa.credentials import BusCredentials

REPO = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


async def eventually(check: Callable[[], Any], timeout: float = 10.0, interval: float = 0.05, what: str = "condition") -> Any:
    """Poll `check` (sync or async) until it returns something truthy."""
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if asyncio.iscoroutine(result):
            result = await result
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        await asyncio.sleep(interval)


class ServiceProcess:
    """`python -m PACKAGE` with its own environment; stdout and stderr go to a log file."""

    def __init__(self, package: str, env: dict[str, str], log_file: Path, args: list[str] | None = None) -> None:
        self.package = package
        self.env = env
        self.log_file = log_file
        self.args = args or []
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with open(self.log_file, "ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", self.package, *self.args], env=self.env, stdout=log, stderr=subprocess.STDOUT, cwd=REPO
            )

    def stop(self, timeout: float = 10.0) -> int | None:
        if self.process is None:
            return None
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self.process.returncode

    def log(self) -> str:
        return self.log_file.read_text(errors="replace") if self.log_file.exists() else ""


# --- a nats-server with authentication, as `wgmfa up` runs it --------------------------------


@dataclass
class SecuredNats:
    """A test nats-server with wgmfa's roles (credentials in `credentials`), plus a
    `harness` user allowed everything, which tests use to play any part and to look at
    the whole bus. `url` carries the harness login; services get `plain_url` and their own
    role's NKey."""

    server: NatsServer
    credentials: BusCredentials
    harness_password: str

    @property
    def log_file(self) -> Path:
        return self.server.log_file

    @property
    def plain_url(self) -> str:
        return self.server.url

    @property
    def url(self) -> str:
        return self.server.url.replace("nats://", f"nats://harness:{self.harness_password}@", 1)

    def authorization(self) -> str:
        harness = (
            "    # tests only: plays any part\n"
            f'    {{ user: "harness", password: "{self.harness_password}", permissions: {{ publish: ">", subscribe: ">" }} }}'
        )
        return self.credentials.authorization([harness])

    def allow_gateway(self, location_id: int, gateway_id: str) -> str:
        """Admit a gateway's role (a configuration reload, as `wgmfa up` does); its name."""
        role = self.credentials.add_gateway(location_id, gateway_id)
        self.server.reload(self.authorization())
        return role

    def seed(self, role: str) -> str:
        return self.credentials.seed(role)

    def stop(self) -> None:
        """NATS goes away, as an outage would."""
        self.server.stop()

    async def connect(self, role: str, **kw: Any) -> Bus:
        """A connection as `role`, the way the role's process makes it."""
        return await Bus.connect(self.plain_url, f"test-{role}", wait_s=5, nkey_seed=self.seed(role),
                                 inbox_prefix=permissions.inbox_prefix(role), **kw)


_SECURED: dict[str, SecuredNats] = {}  # by harness URL: what Stack needs to give services their roles


def secured(nats_url: str) -> SecuredNats | None:
    return _SECURED.get(nats_url)


@contextlib.contextmanager
def secured_nats_server(prefix: str = "wgmfa-nats-") -> Iterator[SecuredNats]:
    """A nats-server with JetStream on a free port, a fresh store and authentication on."""
    directory = Path(tempfile.mkdtemp(prefix=prefix))
    credentials = BusCredentials(directory / "credentials").ensure()
    secured_server = SecuredNats(NatsServer(directory / "server"), credentials, secrets.token_hex(16))
    secured_server.server.authorization = secured_server.authorization()
    secured_server.server.start()
    _SECURED[secured_server.url] = secured_server
    try:
        yield secured_server
    finally:
        _SECURED.pop(secured_server.url, None)
        secured_server.server.stop()
        shutil.rmtree(directory, ignore_errors=True)


async def serve_endpoints(bus: Bus, endpoints: dict[str, Callable[..., Any]]) -> None:
    """Answer these subjects on `bus` as the core answers its own (events.bus.RpcRouter)."""
    router = bus.rpc_router()
    for subject, handler in endpoints.items():
        router.endpoint(subject, handler)
    await bus.serve(router)


def service_env(nats_url: str, state_dir: Path, **settings: Any) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("WGMFA_")}
    env.update(WGMFA_NATS_URL=nats_url, WGMFA_STATE_DIR=str(state_dir), PYTHONUNBUFFERED="1")
    for key, value in settings.items():
        env[f"WGMFA_{key.upper()}"] = value if isinstance(value, str) else json.dumps(value)
    return env


async def confirm_totp(admin: AdminClient, username: str, secret: str) -> None:
    """Confirm with the previous step's code, so the current step is still free for a
    login; once more if a step boundary passed between computing and checking it."""
    for attempt in range(2):
        previous = pyotp.TOTP(secret).at(utcnow() - timedelta(seconds=30))
        try:
            await admin.call(
                "totp_confirm",
                rpc.TotpConfirmRequest(username=username, code_sealed=await admin.seal_for_core(previous)),
                rpc.UserInfo,
            )
            return
        except rpc.RpcFailure as failure:
            if attempt or failure.error.status != rpc.ErrorStatus.UNAUTHENTICATED:
                raise


async def read_stream(bus: Bus, filter_subject: str, *, timeout: float = 0.5) -> list[dict[str, Any]]:
    """Every stored message on `filter_subject`, oldest first, as JSON objects."""
    from faststream.nats import DeliverPolicy

    from wgmfa.tail import stream_for

    sub = await nats_direct.ordered_subscribe(bus.broker, filter_subject, stream_for(filter_subject), DeliverPolicy.ALL)
    found = []
    try:
        while True:
            try:
                msg = await sub.next_msg(timeout=timeout)
            except Exception:
                break
            found.append({"subject": msg.subject, **json.loads(msg.data)})
    finally:
        await sub.unsubscribe()
    return found


class Stack:
    """nats-server (given) + core + proxy as processes, and clients to drive them."""

    def __init__(self, nats_url: str, work_dir: Path, *, database_url: str | None = None, **settings: Any) -> None:
        self.nats_url = nats_url
        self.work_dir = work_dir
        self.state_dir = work_dir / "state"
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.proxy_port = free_port()
        self.proxy_url = f"http://127.0.0.1:{self.proxy_port}"
        common = dict(settings)
        if database_url:
            common["database_url"] = database_url
        # Services run with their own roles when the server has wgmfa's authentication.
        self.secured = secured(nats_url)
        if self.secured is not None:
            common["nats_credentials_dir"] = str(self.secured.credentials.directory)
        service_url = self.secured.plain_url if self.secured else nats_url
        self.env = service_env(service_url, self.state_dir, proxy_port=str(self.proxy_port), **common)
        self.core = ServiceProcess("core_service", self.env, work_dir / "core.log")
        self.proxy = ServiceProcess("proxy_service", self.env, work_dir / "proxy.log")
        self.admin: AdminClient | None = None
        self.http = httpx.AsyncClient(base_url=self.proxy_url, timeout=15)
        self.extra: list[ServiceProcess] = []

    async def start(self) -> "Stack":
        self.core.start()
        self.proxy.start()
        await self.wait_core()
        await eventually(self._proxy_healthy, timeout=20, what="proxy health")
        self.admin = AdminClient(await self.connect(permissions.ADMIN), timeout_s=10)
        return self

    async def connect(self, role: str) -> Bus:
        """A connection as `role`, with the credentials this stack's services use (none on
        a server without authentication)."""
        settings = BusSettings(
            nats_url=self.env["WGMFA_NATS_URL"],
            state_dir=self.state_dir,
            nats_credentials_dir=self.env.get("WGMFA_NATS_CREDENTIALS_DIR"),
            nats_ca_file=self.env.get("WGMFA_NATS_CA_FILE"),
        )
        return await Bus.connect_as(settings, role, f"test-{role}", wait_s=10)

    async def wait_core(self, timeout: float = 30) -> None:
        bus = await self.connect(permissions.ADMIN)
        try:

            async def answered() -> bool:
                try:
                    await bus.call(subjects.RPC_CORE_HELLO, rpc.CoreHello(), rpc.CoreHelloResult, timeout=1)
                    return True
                except BusUnavailable:
                    assert self.core.process and self.core.process.poll() is None, f"core exited:\n{self.core.log()}"
                    return False

            try:
                await eventually(answered, timeout=timeout, interval=0.1, what="the core")
            except AssertionError as error:
                if self.core.process is None or self.core.process.poll() is not None:
                    raise  # it exited: the error carries its log
                # alive but silent: what it was doing is in its log
                raise AssertionError(f"{error}; the end of the core's log:\n{self.core.log()[-8000:]}") from None
        finally:
            await bus.close()

    async def _proxy_healthy(self) -> bool:
        try:
            return (await self.http.get("/api/v1/health")).status_code == 200
        except httpx.HTTPError:
            return False

    async def extra_core(self) -> ServiceProcess:
        """Another core process on the same bus and database, in the RPC queue group."""
        index = sum(1 for p in self.extra if p.package == "core_service") + 2
        env = dict(self.env, WGMFA_LOG_LEVEL="INFO")
        process = ServiceProcess("core_service", env, self.work_dir / f"core-{index}.log")
        process.start()
        self.extra.append(process)

        def ready() -> bool:
            assert process.process and process.process.poll() is None, f"core {index} exited:\n{process.log()}"
            return "core ready" in process.log()

        await eventually(ready, timeout=30, what=f"core {index}")
        return process

    async def extra_proxy(self) -> tuple[ServiceProcess, str]:
        """Another proxy process on the same bus: (process, its URL)."""
        port = free_port()
        env = dict(self.env, WGMFA_PROXY_PORT=str(port))
        process = ServiceProcess("proxy_service", env, self.work_dir / f"proxy-{port}.log")
        process.start()
        self.extra.append(process)
        url = f"http://127.0.0.1:{port}"

        async def healthy() -> bool:
            try:
                return (await self.http.get(f"{url}/api/v1/health")).status_code == 200
            except httpx.HTTPError:
                return False

        await eventually(healthy, timeout=20, what="the second proxy")
        return process, url

    def allow_gateway(self, location_id: int, gateway_id: str) -> None:
        """Give a gateway process of this stack its NATS role (before starting it)."""
        if self.secured is not None:
            self.secured.allow_gateway(location_id, gateway_id)

    async def stop(self) -> None:
        await self.http.aclose()
        if self.admin is not None:
            await self.admin.close()
        for process in self.extra:
            process.stop()
        self.proxy.stop()
        self.core.stop()

    def logs(self) -> str:
        return self.core.log() + self.proxy.log() + "".join(p.log() for p in self.extra)

    # --- operator actions ---------------------------------------------------------------

    async def add_location(
        self, name: str = "office", *, mfa: str = "internal", network: str = "10.10.0.0/24",
        endpoint_host: str = "172.31.0.1", endpoint_port: int = 51820, **kw: Any,
    ) -> rpc.LocationAddResult:
        assert self.admin
        return await self.admin.call(
            "location_add",
            rpc.LocationAddRequest(
                name=name, endpoint=f"{endpoint_host}:{endpoint_port}", network=network, mfa_mode=mfa,
                reply_key=self.admin.reply_key.public, **kw,
            ),
            rpc.LocationAddResult,
        )

    async def add_user_with_totp(self, username: str = "alice") -> str:
        """Creates the user, enrolls and confirms TOTP; returns the secret. The confirmation
        uses the previous time step, so the current step is still free for a login."""
        assert self.admin
        await self.admin.call("user_add", rpc.UserAddRequest(username=username, email=f"{username}@example.com"), rpc.UserInfo)
        enrolled = await self.admin.call(
            "totp_enroll", rpc.TotpEnrollRequest(username=username, reply_key=self.admin.reply_key.public), rpc.TotpEnrollResult
        )
        secret = pyotp.parse_uri(self.admin.reply_key.open(enrolled.otpauth_uri_sealed)).secret
        await confirm_totp(self.admin, username, secret)
        return secret

    async def add_device(self, username: str, name: str, location: str) -> tuple[str, rpc.DeviceConfig]:
        """Returns (private key, config)."""
        assert self.admin
        private, public = generate_keypair()
        config = await self.admin.call(
            "device_add", rpc.DeviceAddRequest(username=username, name=name, location=location, pubkey=public), rpc.DeviceConfig
        )
        return private, config

    async def read(self, filter_subject: str) -> list[dict[str, Any]]:
        """Every stored message on `filter_subject`, read as the harness (no role of the
        system may read every stream)."""
        bus = await Bus.connect(self.nats_url, "test-reader", wait_s=5)
        try:
            return await read_stream(bus, filter_subject)
        finally:
            await bus.close()

    async def allow_mobile(self, username: str, device_name: str) -> str:
        """An admin's allowance for the device's phone app; returns its one-time code."""
        assert self.admin
        allowed = await self.admin.call(
            "mobile_allow",
            rpc.MobileAllowRequest(username=username, device_name=device_name, reply_key=self.admin.reply_key.public),
            rpc.MobileAllowResult,
        )
        return self.admin.reply_key.open(allowed.code_sealed)


class BusCapture:
    """Every message on the server (`>`: streams, requests, replies, inboxes), for
    checking that no secret crosses the bus in clear."""

    def __init__(self) -> None:
        self.messages: list[tuple[str, bytes, dict[str, str]]] = []
        self._bus: Bus | None = None

    async def start(self, nats_url: str) -> "BusCapture":
        self._bus = await Bus.connect(nats_url, "test-capture", wait_s=5)

        async def record(msg: Any) -> None:
            self.messages.append((msg.subject, msg.data, dict(msg.headers or {})))

        await nats_direct.client(self._bus.broker).subscribe(">", cb=record)
        await nats_direct.client(self._bus.broker).flush()
        return self

    async def stop(self) -> None:
        if self._bus is not None:
            await nats_direct.client(self._bus.broker).flush()
            await asyncio.sleep(0.2)
            await self._bus.close()

    def text(self) -> str:
        parts = []
        for subject, data, headers in self.messages:
            parts.append(subject)
            parts.append(data.decode("utf-8", errors="replace"))
            parts.extend(f"{k}: {v}" for k, v in headers.items())
        return "\n".join(parts)

    def subjects(self) -> set[str]:
        return {subject for subject, _, _ in self.messages}


def assert_no_secret(text: str, secrets: dict[str, str], where: str) -> None:
    """None of `secrets` appears in `text`. Six-digit codes count only where they stand
    alone (not inside a longer number or a timestamp)."""
    import re

    for name, secret in secrets.items():
        if not secret:
            continue
        if secret.isdigit() and len(secret) <= 8:
            pattern = re.compile(rf"(?<![\d.:]){re.escape(secret)}(?!\d)")
            found = pattern.search(text)
        else:
            found = secret in text
        assert not found, f"the {name} appears in clear in {where}"
