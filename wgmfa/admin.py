"""`wgmfa admin`: manage the system through the core over NATS request/reply."""
from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Any

import segno

from events import permissions, subjects
from events.bus import Bus, BusUnavailable
from events.sealing import ReplyKey, generate_keypair, seal
from events.settings import BusSettings
from schemas import rpc
from schemas.rpc import RpcFailure
from wgmfa.output import fail, print_json, print_table

EXIT_ERROR = 1
EXIT_UNAVAILABLE = 3


class AdminClient:
    def __init__(self, bus: Bus, timeout_s: float) -> None:
        self.bus = bus
        self.timeout_s = timeout_s
        self.reply_key = ReplyKey()
        self._core_key: str | None = None

    @classmethod
    async def connect(cls, settings: BusSettings) -> "AdminClient":
        try:
            bus = await Bus.connect_as(settings, permissions.ADMIN, "wgmfa-admin", wait_s=3)
        except BusUnavailable as exc:
            raise BusUnavailable(f"{exc} (is `wgmfa up` running? set WGMFA_NATS_URL)") from None
        return cls(bus, settings.rpc_timeout_s)

    async def call(self, command: str, request: Any, result_type: type) -> Any:
        return await self.bus.call(subjects.admin_rpc(command), request, result_type, timeout=self.timeout_s)

    async def seal_for_core(self, secret: str) -> str:
        if self._core_key is None:
            hello = await self.bus.call(subjects.RPC_CORE_HELLO, rpc.CoreHello(), rpc.CoreHelloResult, timeout=self.timeout_s)
            self._core_key = hello.rpc_public_key
        return seal(self._core_key, secret)

    async def close(self) -> None:
        await self.bus.close()


def write_secret_file(path: str, content: str) -> None:
    """Create (or replace) a file only its owner can read."""
    target = Path(path)
    fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(content)
    os.chmod(target, 0o600)


def print_qr(text: str) -> None:
    segno.make(text, error="m").terminal(compact=True)


# --- commands ------------------------------------------------------------------------------


async def location_add(client: AdminClient, args: argparse.Namespace) -> int:
    result: rpc.LocationAddResult = await client.call(
        "location_add",
        rpc.LocationAddRequest(
            name=args.name,
            endpoint=args.endpoint,
            network=args.network,
            mfa_mode=args.mfa,
            threshold_s=args.threshold,
            lifetime_s=args.lifetime,
            keepalive_s=args.keepalive,
            reply_key=client.reply_key.public,
        ),
        rpc.LocationAddResult,
    )
    credentials = json.loads(client.reply_key.open(result.credentials_sealed))
    credentials_json = json.dumps(credentials, indent=2)
    if args.credentials_file:
        write_secret_file(args.credentials_file, credentials_json + "\n")
    if args.json:
        print_json({"location": result.location, "credentials": credentials})
        return 0
    loc = result.location
    print(f"location {loc.name} created with id {loc.id}")
    print(f"  endpoint {loc.endpoint}, network {loc.network}, gateway address {loc.gateway_address}")
    print(f"  MFA {loc.mfa_mode.value}, threshold {loc.threshold_s} s, lifetime {loc.lifetime_s} s, keepalive {loc.keepalive_s} s")
    print(f"  server public key {loc.server_pubkey}")
    if args.credentials_file:
        print(f"gateway credentials written to {args.credentials_file} (keep it secret)")
    else:
        print("gateway credentials (keep them secret; `wgmfa admin gateway add` writes them to a file):")
        print(credentials_json)
    return 0


async def location_list(client: AdminClient, args: argparse.Namespace) -> int:
    result: rpc.LocationListResult = await client.call("location_list", rpc.Empty(), rpc.LocationListResult)
    if args.json:
        print_json(result.locations)
    else:
        print_table(
            [loc.model_dump() for loc in result.locations],
            ["id", "name", "endpoint", "network", "mfa_mode", "threshold_s", "lifetime_s"],
        )
    return 0


async def gateway_add(client: AdminClient, args: argparse.Namespace) -> int:
    result: rpc.GatewayCredentialsResult = await client.call(
        "gateway_credentials",
        rpc.GatewayCredentialsRequest(location=args.location, reply_key=client.reply_key.public),
        rpc.GatewayCredentialsResult,
    )
    credentials = json.loads(client.reply_key.open(result.credentials_sealed))
    output = args.output or f"gateway-{credentials['location_name']}.json"
    write_secret_file(output, json.dumps(credentials, indent=2) + "\n")
    if args.json:
        print_json({"credentials_file": output, "location_id": credentials["location_id"]})
    else:
        print(f"gateway credentials for location {credentials['location_name']} written to {output}")
        print(f"start a gateway with: python -m gateway_worker --credentials {output}")
    return 0


async def user_add(client: AdminClient, args: argparse.Namespace) -> int:
    user: rpc.UserInfo = await client.call("user_add", rpc.UserAddRequest(username=args.username, email=args.email), rpc.UserInfo)
    if args.json:
        print_json(user)
    else:
        print(f"user {user.username} created with id {user.id}")
    return 0


async def user_list(client: AdminClient, args: argparse.Namespace) -> int:
    result: rpc.UserListResult = await client.call("user_list", rpc.Empty(), rpc.UserListResult)
    if args.json:
        print_json(result.users)
    else:
        print_table([u.model_dump() for u in result.users], ["id", "username", "email", "is_active", "totp_enabled"])
    return 0


async def totp_enroll(client: AdminClient, args: argparse.Namespace) -> int:
    result: rpc.TotpEnrollResult = await client.call(
        "totp_enroll", rpc.TotpEnrollRequest(username=args.username, reply_key=client.reply_key.public), rpc.TotpEnrollResult
    )
    uri = client.reply_key.open(result.otpauth_uri_sealed)
    if args.json:
        print_json({"username": args.username, "otpauth_uri": uri})
        return 0
    print(f"scan this with {args.username}'s authenticator app (shown once):")
    print_qr(uri)
    print(uri)
    print(f"then activate it with: wgmfa admin totp confirm {args.username} CODE")
    return 0


async def totp_confirm(client: AdminClient, args: argparse.Namespace) -> int:
    user: rpc.UserInfo = await client.call(
        "totp_confirm",
        rpc.TotpConfirmRequest(username=args.username, code_sealed=await client.seal_for_core(args.code)),
        rpc.UserInfo,
    )
    if args.json:
        print_json(user)
    else:
        print(f"TOTP is active for {user.username}")
    return 0


async def email_mfa(client: AdminClient, args: argparse.Namespace) -> int:
    user: rpc.UserInfo = await client.call(
        "email_mfa", rpc.EmailMfaRequest(username=args.username, enabled=args.action == "enable"), rpc.UserInfo
    )
    if args.json:
        print_json(user)
    else:
        print(f"email MFA is {'on' if user.email_mfa_enabled else 'off'} for {user.username} ({user.email})")
    return 0


async def mobile_allow(client: AdminClient, args: argparse.Namespace) -> int:
    result: rpc.MobileAllowResult = await client.call(
        "mobile_allow",
        rpc.MobileAllowRequest(username=args.username, device_name=args.device_name, valid_s=args.valid),
        rpc.MobileAllowResult,
    )
    if args.json:
        print_json(result)
    else:
        print(f"the phone app of {result.username}/{result.device_name} may register its key until "
              f"{result.until:%Y-%m-%d %H:%M:%S} UTC (once)")
    return 0


async def device_add(client: AdminClient, args: argparse.Namespace) -> int:
    private_key = None
    pubkey = args.pubkey
    if not pubkey:
        # The private key is made here and never leaves this machine.
        private_key, pubkey = generate_keypair()
    config: rpc.DeviceConfig = await client.call(
        "device_add",
        rpc.DeviceAddRequest(username=args.username, name=args.device_name, location=args.location, pubkey=pubkey),
        rpc.DeviceConfig,
    )
    document = config.model_dump(mode="json")
    document["proxy_url"] = args.proxy_url
    if private_key:
        document["private_key"] = private_key
    if args.output:
        write_secret_file(args.output, json.dumps(document, indent=2) + "\n")
    if args.json:
        print_json(document)
        return 0
    print(f"device {config.device_name} of {config.username} added to {config.location_name} as {config.address}")
    if args.output:
        print(f"device config written to {args.output}")
    else:
        print(json.dumps(document, indent=2))
    if not private_key:
        print("(no private key shown: the device already has it)")
    return 0


async def device_list(client: AdminClient, args: argparse.Namespace) -> int:
    result: rpc.DeviceListResult = await client.call(
        "device_list", rpc.DeviceListRequest(username=args.user), rpc.DeviceListResult
    )
    if args.json:
        print_json(result.devices)
    else:
        print_table(
            [d.model_dump() for d in result.devices],
            ["device_id", "device_name", "username", "location_name", "address", "pubkey"],
        )
    return 0


async def sessions(client: AdminClient, args: argparse.Namespace) -> int:
    result: rpc.SessionsResult = await client.call(
        "sessions",
        rpc.SessionsRequest(location=args.location, include_revoked=not args.live, limit=args.limit),
        rpc.SessionsResult,
    )
    if args.json:
        print_json(result.sessions)
    else:
        print_table(
            [s.model_dump() for s in result.sessions],
            [
                "id", "location_name", "username", "device_name", "method", "state",
                "authorized_at", "connected_at", "expires_at", "revoked_at", "revoke_reason",
            ],
        )
    return 0


async def revoke(client: AdminClient, args: argparse.Namespace) -> int:
    info: rpc.SessionInfo = await client.call("revoke", rpc.RevokeRequest(session_id=args.session_id), rpc.SessionInfo)
    if args.json:
        print_json(info)
    else:
        print(f"session {info.id} ({info.username}/{info.device_name} at {info.location_name}) revoked")
    return 0


def add_parser(subparsers: argparse._SubParsersAction, json_flag: argparse.ArgumentParser) -> None:
    admin = subparsers.add_parser("admin", help="manage locations, users, devices and sessions", parents=[json_flag])
    areas = admin.add_subparsers(dest="area", required=True, metavar="AREA")

    location = areas.add_parser("location", help="WireGuard locations").add_subparsers(dest="action", required=True)
    p = location.add_parser("add", help="create a location", parents=[json_flag])
    p.add_argument("name")
    p.add_argument("--endpoint", required=True, help="HOST:PORT clients connect to")
    p.add_argument("--network", required=True, help="VPN network, e.g. 10.10.0.0/24")
    p.add_argument("--mfa", choices=["internal", "external", "disabled"], default="internal")
    p.add_argument("--threshold", type=int, help="peer disconnect threshold in seconds (default 300)")
    p.add_argument("--lifetime", type=int, help="absolute session lifetime in seconds (default 43200)")
    p.add_argument("--keepalive", type=int, help="persistent keepalive for clients in seconds (default 25)")
    p.add_argument("--credentials-file", help="write the gateway credentials here (mode 0600) instead of printing them")
    p.set_defaults(run=location_add)
    p = location.add_parser("list", help="list locations", parents=[json_flag])
    p.set_defaults(run=location_list)

    gateway = areas.add_parser("gateway", help="gateway credentials").add_subparsers(dest="action", required=True)
    p = gateway.add_parser("add", help="write a location's gateway credentials file", parents=[json_flag])
    p.add_argument("location")
    p.add_argument("--output", "-o", help="file to write (default gateway-LOCATION.json)")
    p.set_defaults(run=gateway_add)

    user = areas.add_parser("user", help="users").add_subparsers(dest="action", required=True)
    p = user.add_parser("add", help="create a user", parents=[json_flag])
    p.add_argument("username")
    p.add_argument("--email", required=True)
    p.set_defaults(run=user_add)
    p = user.add_parser("list", help="list users", parents=[json_flag])
    p.set_defaults(run=user_list)

    totp = areas.add_parser("totp", help="TOTP enrollment").add_subparsers(dest="action", required=True)
    p = totp.add_parser("enroll", help="make a new TOTP secret; prints the otpauth URI and its QR code once", parents=[json_flag])
    p.add_argument("username")
    p.set_defaults(run=totp_enroll)
    p = totp.add_parser("confirm", help="activate the enrolled secret with a code from the app", parents=[json_flag])
    p.add_argument("username")
    p.add_argument("code")
    p.set_defaults(run=totp_confirm)

    email = areas.add_parser("email", help="email MFA").add_subparsers(dest="action", required=True)
    for action, text in (("enable", "let a user receive codes by email"), ("disable", "stop emailed codes for a user")):
        p = email.add_parser(action, help=text, parents=[json_flag])
        p.add_argument("username")
        p.set_defaults(run=email_mfa)

    mobile = areas.add_parser("mobile", help="mobile app keys").add_subparsers(dest="action", required=True)
    p = mobile.add_parser("allow", help="let a device's phone app register its signing key (once)", parents=[json_flag])
    p.add_argument("username")
    p.add_argument("device_name")
    p.add_argument("--valid", type=int, default=3600, help="seconds the allowance lasts (default 3600)")
    p.set_defaults(run=mobile_allow)

    device = areas.add_parser("device", help="devices").add_subparsers(dest="action", required=True)
    p = device.add_parser("add", help="add a device to a location and print its config", parents=[json_flag])
    p.add_argument("username")
    p.add_argument("device_name")
    p.add_argument("--location", required=True, help="location name or id")
    p.add_argument("--pubkey", help="the device's WireGuard public key (default: make a key pair here)")
    p.add_argument("--output", "-o", help="write the device config here (mode 0600)")
    p.add_argument("--proxy-url", default=os.environ.get("WGMFA_PUBLIC_URL", "http://127.0.0.1:8080"),
                   help="the proxy URL the client talks to (default $WGMFA_PUBLIC_URL or http://127.0.0.1:8080)")
    p.set_defaults(run=device_add)
    p = device.add_parser("list", help="list devices and where they are", parents=[json_flag])
    p.add_argument("--user")
    p.set_defaults(run=device_list)

    p = areas.add_parser("sessions", help="list VPN sessions, newest first", parents=[json_flag])
    p.add_argument("--location", help="location name or id")
    p.add_argument("--live", action="store_true", help="only authorized and connected sessions")
    p.add_argument("--limit", type=int, default=100)
    p.set_defaults(run=sessions)

    p = areas.add_parser("revoke", help="revoke a session: the peer leaves every gateway", parents=[json_flag])
    p.add_argument("session_id", type=int)
    p.set_defaults(run=revoke)


async def run(args: argparse.Namespace) -> int:
    try:
        client = await AdminClient.connect(BusSettings())
    except BusUnavailable as exc:
        return fail(str(exc), EXIT_UNAVAILABLE)
    try:
        return await args.run(client, args)
    except RpcFailure as exc:
        return fail(exc.error.message, EXIT_ERROR)
    except BusUnavailable as exc:
        return fail(f"the core did not answer: {exc}", EXIT_UNAVAILABLE)
    finally:
        await client.close()
