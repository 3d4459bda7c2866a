"""`wgmfa client`: the reference VPN client. It runs the MFA exchange with the proxy the
way Defguard's desktop client does, then brings up a local userspace WireGuard interface
with the PSK and waits for the first handshake."""
from __future__ import annotations

import argparse
import asyncio
import hashlib
import ipaddress
import json
import os
import socket
import sys
import time
import webbrowser
from pathlib import Path
from typing import Any

import httpx
import pyotp
import segno
import websockets
import websockets.exceptions

from runtime.errors import WgmfaError
from runtime.settings import BusSettings
from wireguard.port import BackendError, BackendUnavailable, InterfaceConfig, PeerConfig
from wireguard.common import resolve_endpoint, run_ip
from wireguard.userspace import UserspaceBackend
from schemas.sealing import generate_keypair
from schemas.common import MfaMethod
from wgmfa.admin import write_secret_file
from wgmfa.mobile import load_key, qr_payload, sign
from wgmfa.output import fail

EXIT_MFA = 1
EXIT_NO_HANDSHAKE = 4
EXIT_UNAVAILABLE = 3


class MfaFailed(WgmfaError):
    """Raised when the proxy cannot be reached or refuses a step of the MFA login; the
    message is what the user is shown."""


def load_config(path: str) -> dict[str, Any]:
    try:
        config = json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise SystemExit(fail(f"cannot read device config {path}: {exc}", 2)) from None
    missing = {"location_id", "pubkey", "private_key", "endpoint", "server_pubkey", "address", "allowed_ips"} - set(config)
    if missing:
        raise SystemExit(fail(f"device config {path} lacks {', '.join(sorted(missing))}", 2))
    return config


def interface_name(config: dict[str, Any], args: argparse.Namespace) -> str:
    """--interface, or one named after the namespace too: wireguard-go's UAPI socket
    (/var/run/wireguard/<name>.sock) is one directory for every network namespace, so two
    clients in two namespaces need two names."""
    if args.interface:
        return args.interface
    if not args.netns:
        return f"wgmfa-c{config['location_id']}"
    suffix = str(config["location_id"])
    return f"wgc{hashlib.sha256(args.netns.encode()).hexdigest()[:15 - 3 - len(suffix) - 1]}-{suffix}"


async def preflight(config: dict[str, Any], name: str, netns: str | None, backend: UserspaceBackend) -> None:
    """What would make the connection fail after the second factor was spent: checked
    before. Raises BackendError or BackendUnavailable with the reason."""
    address, _port = resolve_endpoint(config["endpoint"])
    if ipaddress.ip_address(address.split("%")[0]).is_unspecified:
        raise BackendError(f"endpoint {config['endpoint']} is not an address a tunnel can reach")
    backend.wireguard_go()
    if await backend.socket_of_another_namespace(name, netns):
        raise BackendError(
            f"interface name {name} is taken by an interface in another network namespace "
            "(wireguard-go's sockets are shared by all of them): choose another with --interface"
        )


def state_file(name: str) -> Path:
    return BusSettings().state_dir / "client" / f"{name}.json"


METHODS = {
    "totp": MfaMethod.TOTP,
    "email": MfaMethod.EMAIL,
    "oidc": MfaMethod.OIDC,
    "biometric": MfaMethod.BIOMETRIC,
    "mobile": MfaMethod.MOBILE_APPROVE,
}
NOT_AVAILABLE = "selected MFA method not available"
OIDC_POLL_S = 2.0


class Proxy:
    def __init__(self, url: str) -> None:
        self.url = url
        self.http = httpx.AsyncClient(base_url=url, timeout=30)

    async def call(self, route: str, body: dict[str, Any]) -> dict[str, Any]:
        try:
            response = await self.http.post(f"/api/v1/client-mfa/{route}", json=body)
        except httpx.HTTPError as exc:
            raise MfaFailed(f"cannot reach the proxy at {self.url}: {exc}") from None
        try:
            document = response.json()
        except ValueError:
            raise MfaFailed(f"the proxy answered {response.status_code} without JSON") from None
        if response.status_code != 200:
            raise MfaFailed(str(document.get("error", response.status_code)))
        return document

    async def poll_finish(self, token: str, timeout: float) -> str:
        """Ask finish until the browser login is done (428 meanwhile); the PSK once."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                response = await self.http.post("/api/v1/client-mfa/finish", json={"token": token})
            except httpx.HTTPError as exc:
                raise MfaFailed(f"cannot reach the proxy at {self.url}: {exc}") from None
            if response.status_code == 200:
                return response.json()["preshared_key"]
            if response.status_code != 428:
                try:
                    reason = response.json().get("error", response.status_code)
                except ValueError:
                    reason = response.status_code
                raise MfaFailed(f"the browser login did not succeed: {reason}")
            if time.monotonic() > deadline:
                raise MfaFailed("the browser login was not completed in time")
            await asyncio.sleep(OIDC_POLL_S)

    async def remote_psk(self, token: str, timeout: float) -> str:
        """Wait on the WebSocket for the phone's approval; the PSK comes down it once."""
        url = self.url.replace("https://", "wss://", 1).replace("http://", "ws://", 1)
        try:
            async with websockets.connect(f"{url}/api/v1/client-mfa/remote?token={token}", open_timeout=30) as ws:
                frame = json.loads(await asyncio.wait_for(ws.recv(), timeout))
        except asyncio.TimeoutError:
            raise MfaFailed("no approval arrived in time") from None
        except websockets.exceptions.InvalidStatus as exc:
            raise MfaFailed(f"the proxy refused to wait: HTTP {exc.response.status_code}") from None
        except websockets.exceptions.ConnectionClosed as exc:
            raise MfaFailed(f"the proxy stopped waiting: {exc.rcvd.reason if exc.rcvd else 'closed'}") from None
        except OSError as exc:
            raise MfaFailed(f"cannot reach the proxy at {self.url}: {exc}") from None
        if frame.get("type") != "mfa_success" or "preshared_key" not in frame:
            raise MfaFailed(f"unexpected message from the proxy: {frame.get('type')}")
        return frame["preshared_key"]

    async def close(self) -> None:
        await self.http.aclose()


def offered_methods(config: dict[str, Any], args: argparse.Namespace) -> list[str]:
    """What the location's mode allows this client to try (the user's own set-up decides
    the rest: the proxy answers `selected MFA method not available`)."""
    if config.get("mfa_mode") == "external":
        return ["oidc"]
    methods = ["totp", "email", "mobile"]
    if args.key_file:
        methods.insert(2, "biometric")
    return methods


async def ask(prompt: str) -> str:
    try:
        return (await asyncio.to_thread(input, prompt)).strip()
    except EOFError:
        raise MfaFailed("no answer (input closed): pass --method and --code") from None


async def run_mfa(config: dict[str, Any], args: argparse.Namespace) -> str:
    """The PSK for this connection, after the second factor."""
    proxy = Proxy(args.proxy_url or config.get("proxy_url") or "http://127.0.0.1:8080")
    try:
        offered = offered_methods(config, args)
        if args.method or args.code:  # a code without a method is a TOTP code: no prompt at all
            return await run_method(proxy, config, args, args.method or "totp")
        while True:
            if len(offered) == 1:
                choice = offered[0]
            else:
                print("second factor: " + ", ".join(f"[{i}] {m}" for i, m in enumerate(offered, 1)), flush=True)
                answer = await ask("choose: ")
                choice = offered[int(answer) - 1] if answer.isdigit() and 0 < int(answer) <= len(offered) else answer
                if choice not in offered:
                    print(f"no method {answer!r}", flush=True)
                    continue
            try:
                return await run_method(proxy, config, args, choice)
            except MfaFailed as exc:
                if str(exc) != NOT_AVAILABLE or len(offered) == 1:
                    raise
                print(f"{choice}: not set up for you; choose another", flush=True)
                offered.remove(choice)
    finally:
        await proxy.close()


async def run_method(proxy: Proxy, config: dict[str, Any], args: argparse.Namespace, method: str) -> str:
    started = await proxy.call(
        "start", {"location_id": config["location_id"], "pubkey": config["pubkey"], "method": int(METHODS[method])}
    )
    token = started["token"]
    if method == "totp":
        code = args.code or await ask("TOTP code: ")
        return (await proxy.call("finish", {"token": token, "code": code}))["preshared_key"]
    if method == "email":
        print("a code is on its way to your mailbox", flush=True)
        code = args.code or await ask("emailed code: ")
        return (await proxy.call("finish", {"token": token, "code": code}))["preshared_key"]
    if method == "oidc":
        url = f"{proxy.url.rstrip('/')}/openid/mfa?token={token}"
        print(f"log in with your company account in the browser: {url}", flush=True)
        if args.browser and could_open_browser():
            await asyncio.to_thread(webbrowser.open, url)
        return await proxy.poll_finish(token, timeout=args.timeout_mfa)
    if method == "biometric":
        key = load_key(Path(args.key_file))
        return (await proxy.call("finish", {"token": token, "code": sign(key, started["challenge"])}))["preshared_key"]
    payload = qr_payload(token, started["challenge"], config.get("instance_id", ""))
    print("approve this login with your phone: scan the QR code", flush=True)
    segno.make(payload, error="l").terminal(compact=True)
    print(f"(or on the phone: wgmfa mobile approve {payload} --key-file PHONE.key)", flush=True)
    return await proxy.remote_psk(token, timeout=args.timeout_mfa)


def could_open_browser() -> bool:
    """Only where a graphical browser can show up: on a bare server `webbrowser` would
    start a text browser in this very terminal."""
    return sys.platform in ("darwin", "win32") or bool(os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY"))


async def route_networks(interface: str, config: dict[str, Any], netns: str | None) -> None:
    """Route the networks the location routes (beyond its own, which the address covers)
    through the tunnel."""
    own = ipaddress.ip_interface(config["address"]).network
    for network in config["allowed_ips"]:
        routed = ipaddress.ip_network(network, strict=False)
        if routed.version == own.version and routed.subnet_of(own):  # type: ignore[arg-type]
            continue
        await run_ip("route", "replace", str(routed), "dev", interface, netns=netns)


async def connect(args: argparse.Namespace) -> int:
    config = load_config(args.config)
    name = interface_name(config, args)
    backend = UserspaceBackend()
    try:
        await preflight(config, name, args.netns, backend)
    except (BackendError, BackendUnavailable) as exc:
        return fail(f"cannot connect: {exc}", EXIT_UNAVAILABLE)
    psk = None
    if config.get("mfa_mode", "internal") != "disabled":
        try:
            psk = await run_mfa(config, args)
        except MfaFailed as exc:
            return fail(str(exc), EXIT_MFA)
    interface = InterfaceConfig(name, config["private_key"], 0, config["address"], netns=args.netns)
    code = await bring_up(config, args, name, interface, backend, psk)
    if code != 0:
        # nothing of a failed connection stays behind
        backend.config = interface
        await backend.remove_interface()
        state_file(name).unlink(missing_ok=True)
        print(f"{name} removed", flush=True)
    return code


async def bring_up(config: dict[str, Any], args: argparse.Namespace, name: str, interface: InterfaceConfig,
                   backend: UserspaceBackend, psk: str | None) -> int:
    try:
        # A fresh interface: an earlier session's keys and handshake must not linger.
        backend.config = interface
        await backend.remove_interface()
        await backend.ensure_interface(interface)
        await backend.set_peer(
            PeerConfig(
                public_key=config["server_pubkey"],
                preshared_key=psk,
                allowed_ips=tuple(config["allowed_ips"]),
                persistent_keepalive=config.get("keepalive_s") or None,
                endpoint=config["endpoint"],
            )
        )
        await route_networks(name, config, args.netns)
    except BackendUnavailable as exc:
        return fail(str(exc), EXIT_UNAVAILABLE)
    except BackendError as exc:
        return fail(f"cannot bring up {name}: {exc}", EXIT_UNAVAILABLE)
    path = state_file(name)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"interface": name, "netns": args.netns, "location_id": config["location_id"]}))
    print(f"{name} is up with {config['address']}; waiting for a handshake with {config['endpoint']}", flush=True)
    deadline = time.monotonic() + args.timeout
    while time.monotonic() < deadline:
        status = await backend.status()
        if any(p.public_key == config["server_pubkey"] and p.latest_handshake > 0 for p in status.peers):
            print("connected", flush=True)
            return 0
        await asyncio.sleep(0.25)
    return fail(f"no handshake with {config['endpoint']} within {args.timeout:g} s (gateway down, or not authorized?)",
                EXIT_NO_HANDSHAKE)


async def disconnect(args: argparse.Namespace) -> int:
    if args.config:
        name = interface_name(load_config(args.config), args)
    elif args.interface:
        name = args.interface
    else:
        known = sorted(p.stem for p in (BusSettings().state_dir / "client").glob("*.json"))
        if len(known) != 1:
            return fail("say which connection: --config DEVICE.json or --interface NAME" + (f" (up: {', '.join(known)})" if known else ""), 2)
        name = known[0]
    path = state_file(name)
    netns = args.netns
    if path.exists():
        netns = netns or json.loads(path.read_text()).get("netns")
    backend = UserspaceBackend()
    backend.config = InterfaceConfig(name, "", 0, "", netns=netns)
    await backend.remove_interface()
    path.unlink(missing_ok=True)
    print(f"{name} is down", flush=True)
    return 0


MODES = {1: "disabled", 2: "internal", 3: "external"}


class Enrollment:
    """The enrollment routes, called as Defguard's desktop app calls them: the session
    lives in the `defguard_proxy` cookie `start` sets."""

    def __init__(self, url: str) -> None:
        self.url = url.rstrip("/")
        self.http = httpx.AsyncClient(base_url=self.url, timeout=30)
        self.cookie: str | None = None

    async def call(self, route: str, body: dict[str, Any]) -> dict[str, Any]:
        headers = {"Cookie": self.cookie} if self.cookie else {}
        try:
            response = await self.http.post(f"/api/v1/{route}", json=body, headers=headers)
        except httpx.HTTPError as exc:
            raise MfaFailed(f"cannot reach {self.url}: {exc}") from None
        self.http.cookies.clear()  # the session is the cookie `start` gave, nothing else
        document = response.json() if response.content else {}
        if response.status_code != 200:
            raise MfaFailed(f"{route}: {document.get('error', response.status_code)}")
        if route == "enrollment/start":
            cookie = next((c for c in response.headers.get_list("set-cookie") if c.startswith("defguard_proxy=")), None)
            if cookie is None:
                raise MfaFailed("the server set no enrollment cookie")
            self.cookie = cookie.split(";")[0]
        return document

    async def close(self) -> None:
        await self.http.aclose()


async def set_up_factor(enrollment: Enrollment, started: dict[str, Any], args: argparse.Namespace) -> None:
    """The user's own second factor: TOTP (the secret is shown here only) or email."""
    methods = ["totp", "email"] if started["settings"].get("smtp_configured") else ["totp"]
    method = args.method or (methods[0] if len(methods) == 1 else None)
    while method not in methods:
        answer = await ask("second factor to set up: " + ", ".join(f"[{i}] {m}" for i, m in enumerate(methods, 1)) + ": ")
        method = methods[int(answer) - 1] if answer.isdigit() and 0 < int(answer) <= len(methods) else answer
    setup = await enrollment.call("enrollment/register-mfa/code/start", {"method": int(METHODS[method])})
    for _attempt in range(3):
        if method == "totp":
            secret = setup["totp_secret"]
            uri = pyotp.TOTP(secret).provisioning_uri(name=started["user"]["login"], issuer_name=started["instance"]["name"])
            print("scan this with your authenticator app (shown only here, only now):", flush=True)
            segno.make(uri, error="m").terminal(compact=True)
            print(uri, flush=True)
            code = await ask("the code your app shows: ")
        else:
            print(f"a code is on its way to {started['user']['email']}", flush=True)
            code = await ask("emailed code: ")
        try:
            await enrollment.call("enrollment/register-mfa/code/finish", {"code": code, "method": int(METHODS[method])})
            print(f"{method} is set up", flush=True)
            return
        except MfaFailed as exc:
            print(f"not accepted ({exc}); try again", flush=True)
    raise MfaFailed("the second factor was not set up")


def client_config(config: dict[str, Any], device: dict[str, Any], instance: dict[str, Any], private_key: str,
                  polling_token: str) -> dict[str, Any]:
    """One location of an app's DeviceConfigResponse as `client connect` reads it."""
    allowed = [ip.strip() for ip in config["allowed_ips"].split(",") if ip.strip()]
    address = ipaddress.ip_address(config["assigned_ip"].split(",")[0].split("/")[0])
    prefix = next((ipaddress.ip_network(a).prefixlen for a in allowed if address in ipaddress.ip_network(a)),
                  address.max_prefixlen)
    return {
        "device_id": device["id"], "device_name": device["name"], "username": instance["username"],
        "pubkey": device["pubkey"], "location_id": config["network_id"], "location_name": config["network_name"],
        "endpoint": config["endpoint"], "server_pubkey": config["pubkey"], "address": f"{address}/{prefix}",
        "allowed_ips": allowed, "keepalive_s": config["keepalive_interval"],
        "mfa_mode": MODES.get(config.get("location_mfa_mode") or 0, "internal" if config["mfa_enabled"] else "disabled"),
        "instance_id": instance["id"], "proxy_url": instance["proxy_url"].rstrip("/"), "private_key": private_key,
        "polling_token": polling_token,
    }


async def enroll(args: argparse.Namespace) -> int:
    """Enroll this machine the way Defguard's apps do, and write its device config."""
    enrollment = Enrollment(args.url)
    try:
        started = await enrollment.call("enrollment/start", {"token": args.token})
        print(f"enrolling {started['user']['login']} at {started['instance']['name']}", flush=True)
        if not started["user"]["enrolled"]:
            await set_up_factor(enrollment, started, args)
        private_key, public_key = generate_keypair()
        created = await enrollment.call("enrollment/create_device",
                                        {"name": args.name or socket.gethostname()[:64], "pubkey": public_key})
    except MfaFailed as exc:
        return fail(str(exc), EXIT_MFA)
    finally:
        await enrollment.close()
    configs = created["configs"]
    if not configs:
        return fail("enrolled, but there is no location yet; ask your administrator", EXIT_MFA)
    chosen = next((c for c in configs if c["network_name"] == args.location), None) if args.location else configs[0]
    if chosen is None:
        return fail(f"no location {args.location}; there are: {', '.join(c['network_name'] for c in configs)}", 2)
    document = client_config(chosen, created["device"], created["instance"], private_key, created["token"])
    write_secret_file(args.output, json.dumps(document, indent=2) + "\n")
    print(f"device {created['device']['name']} enrolled; config for {chosen['network_name']} written to {args.output}")
    others = [c["network_name"] for c in configs if c is not chosen]
    if others:
        print(f"other locations: {', '.join(others)} (--location NAME)")
    return 0


def add_parser(subparsers: argparse._SubParsersAction, json_flag: argparse.ArgumentParser) -> None:
    client = subparsers.add_parser("client", help="the reference VPN client (needs root)").add_subparsers(dest="action", required=True)
    p = client.add_parser("connect", help="MFA with the proxy, then bring the tunnel up")
    p.add_argument("--config", required=True, help="the device config `wgmfa admin device add -o` wrote")
    p.add_argument("--method", choices=sorted(METHODS), help="the second factor (default: ask)")
    p.add_argument("--code", help="the TOTP or emailed code (default: ask)")
    p.add_argument("--key-file", help="this phone's signing key, for --method biometric")
    p.add_argument("--interface", help="interface name (default wgmfa-c<location id>)")
    p.add_argument("--netns", help="bring the interface up in this network namespace")
    p.add_argument("--proxy-url", help="override the config's proxy_url")
    p.add_argument("--timeout", type=float, default=30.0, help="seconds to wait for the first handshake")
    p.add_argument("--timeout-mfa", type=float, default=300.0,
                   help="seconds to wait for a phone's approval or the browser login")
    p.add_argument("--no-browser", dest="browser", action="store_false",
                   help="only print the URL of the browser login (method oidc)")
    p.set_defaults(run=connect)
    p = client.add_parser("enroll", help="enroll this machine with an admin's token, as Defguard's apps do")
    p.add_argument("url", help="the URL the admin gave (the proxy)")
    p.add_argument("token", help="the enrollment token")
    p.add_argument("--output", "-o", required=True, help="write the device config here (mode 0600)")
    p.add_argument("--name", help="this device's name (default: the host name)")
    p.add_argument("--method", choices=["totp", "email"], help="the second factor to set up, if you have none")
    p.add_argument("--location", help="the location to write the config for (default: the first)")
    p.set_defaults(run=enroll)
    p = client.add_parser("disconnect", help="take the tunnel down")
    p.add_argument("--config")
    p.add_argument("--interface")
    p.add_argument("--netns")
    p.set_defaults(run=disconnect)
