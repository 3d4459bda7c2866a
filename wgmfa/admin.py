"""`wgmfa admin`: manage the system through the core over NATS request/reply."""
from __future__ import annotations

import argparse
import asyncio
import base64
import getpass
import json
import os
from datetime import datetime, timezone
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import segno

from events import permissions, subjects
from events.bus import Bus, BusUnavailable
from schemas.sealing import ReplyKey, generate_keypair, seal
from runtime.settings import BusSettings
from schemas import rpc
from schemas.rpc import RpcFailure
from wgmfa.output import fail, fmt, print_json, print_table
from wgmfa.tail import parse_duration

EXIT_ERROR = 1
EXIT_UNAVAILABLE = 3


def os_user() -> str:
    try:
        return getpass.getuser()
    except Exception:  # no user name for this uid (containers)
        return f"uid {os.getuid()}"


class AdminClient:
    def __init__(self, bus: Bus, timeout_s: float, actor: str | None = None) -> None:
        self.bus = bus
        self.timeout_s = timeout_s
        self.reply_key = ReplyKey()
        self.actor = actor or os_user()
        self._core_key: str | None = None

    @classmethod
    async def connect(cls, settings: BusSettings, actor: str | None = None) -> "AdminClient":
        try:
            bus = await Bus.connect_as(settings, permissions.ADMIN, "wgmfa-admin", wait_s=3)
        except BusUnavailable as exc:
            raise BusUnavailable(f"{exc} (is `wgmfa up` running? set WGMFA_NATS_URL)") from None
        return cls(bus, settings.rpc_timeout_s, actor)

    async def call(self, command: str, request: Any, result_type: type) -> Any:
        # every change names its admin in the audit trail
        if "actor" in type(request).model_fields and request.actor is None:
            request = request.model_copy(update={"actor": self.actor})
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
            allowed_ips=split_list(args.allowed_ips) or [],
            dns=split_list(args.dns) or [],
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
    if loc.allowed_ips or loc.dns:
        print(f"  routed networks {', '.join(loc.allowed_ips) or '-'}, DNS {', '.join(loc.dns) or '-'}")
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
            [
                loc.model_dump() | {"allowed_ips": ",".join(loc.allowed_ips) or None, "dns": ",".join(loc.dns) or None}
                for loc in result.locations
            ],
            ["id", "name", "endpoint", "network", "mfa_mode", "threshold_s", "lifetime_s", "allowed_ips", "dns"],
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
        "email_mfa",
        rpc.EmailMfaRequest(username=args.username, enabled=args.action == "enable", force=getattr(args, "force", False)),
        rpc.UserInfo,
    )
    if args.json:
        print_json(user)
    else:
        print(f"email MFA is {'on' if user.email_mfa_enabled else 'off'} for {user.username} ({user.email})")
    return 0


async def mobile_allow(client: AdminClient, args: argparse.Namespace) -> int:
    result: rpc.MobileAllowResult = await client.call(
        "mobile_allow",
        rpc.MobileAllowRequest(username=args.username, device_name=args.device_name, valid_s=args.valid,
                               reply_key=client.reply_key.public),
        rpc.MobileAllowResult,
    )
    code = client.reply_key.open(result.code_sealed)
    if args.json:
        print_json(result.model_dump(mode="json", exclude={"code_sealed"}) | {"code": code})
    else:
        print(f"the phone app of {result.username}/{result.device_name} may register its key until "
              f"{result.until:%Y-%m-%d %H:%M:%S} UTC (once), with this code (give it to the user only):")
        print(code)
        print(f"on the phone: wgmfa mobile register --config PHONE.json --key-file PHONE.key --code {code}")
    return 0


def duration_s(text: str) -> int:
    return int(parse_duration(text).total_seconds())


def enrollment_links(public_url: str, token: str) -> tuple[str, str]:
    """(the desktop app's deep link, the mobile app's QR payload: base64 of {url, token})."""
    url = public_url.rstrip("/")
    deep_link = "defguard://addinstance?" + urlencode({"token": token, "url": url})
    qr = base64.b64encode(json.dumps({"url": url, "token": token}).encode()).decode()
    return deep_link, qr


async def enroll(client: AdminClient, args: argparse.Namespace) -> int:
    if args.target == "list":
        listed: rpc.EnrollListResult = await client.call(
            "enroll_list", rpc.EnrollListRequest(include_closed=args.all), rpc.EnrollListResult
        )
        if args.json:
            print_json(listed.enrollments)
        else:
            print_table([e.model_dump() for e in listed.enrollments],
                        ["id", "username", "state", "device_name", "expires_at", "session_deadline"])
        return 0
    if args.target == "revoke":
        if not args.what:
            return fail("say which enrollment to revoke: wgmfa admin enroll revoke ID|USERNAME", 2)
        revoked: rpc.EnrollRevokeResult = await client.call(
            "enroll_revoke", rpc.EnrollRevokeRequest(enrollment=args.what), rpc.EnrollRevokeResult
        )
        if args.json:
            print_json(revoked.revoked)
        else:
            for e in revoked.revoked:
                print(f"enrollment {e.id} of {e.username} revoked")
        return 0
    if args.what:
        return fail(f"unexpected argument {args.what!r}: wgmfa admin enroll USERNAME|list|revoke", 2)
    result: rpc.EnrollCreateResult = await client.call(
        "enroll_create",
        rpc.EnrollCreateRequest(username=args.target, ttl_s=args.ttl, device_name=args.device_name,
                                reply_key=client.reply_key.public),
        rpc.EnrollCreateResult,
    )
    token = client.reply_key.open(result.token_sealed)
    url = args.url.rstrip("/")
    deep_link, qr = enrollment_links(url, token)
    if args.json:
        print_json({"enrollment": result.enrollment, "url": url, "token": token, "deep_link": deep_link,
                    "qr_payload": qr})
        return 0
    e = result.enrollment
    print(f"enrollment for {e.username}, single use, valid until {e.expires_at:%Y-%m-%d %H:%M:%S} UTC (id {e.id})")
    print(f"  URL:   {url}")
    print(f"  token: {token}")
    print(f"desktop app: Add instance with the URL and token, or open {deep_link}")
    print("mobile app: scan this QR code")
    print_qr(qr)
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


LIVE_COLUMNS = ["id", "location_name", "username", "device_name", "state", "endpoint", "handshake", "rx", "tx",
                "idle_deadline", "expires_in"]


def human_bytes(value: int | None) -> str | None:
    if value is None:
        return None
    size = float(value)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if size < 1024 or unit == "TiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return None


def human_duration(seconds: int | None) -> str | None:
    if seconds is None:
        return None
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


def live_row(info: rpc.SessionInfo) -> dict[str, Any]:
    row = info.model_dump()
    row["handshake"] = f"{human_duration(info.handshake_age_s)} ago" if info.handshake_age_s is not None else None
    row["rx"], row["tx"] = human_bytes(info.rx_bytes), human_bytes(info.tx_bytes)
    row["expires_in"] = human_duration(info.expires_in_s)
    return row


async def sessions(client: AdminClient, args: argparse.Namespace) -> int:
    if args.watch and not args.live:
        return fail("--watch needs --live", EXIT_ERROR)
    while True:
        result: rpc.SessionsResult = await client.call(
            "sessions",
            rpc.SessionsRequest(location=args.location, include_revoked=not args.live, limit=args.limit),
            rpc.SessionsResult,
        )
        if args.watch and not args.json:
            print("\033[H\033[2J", end="")  # clear the terminal
            print(f"live sessions at {datetime.now(timezone.utc):%Y-%m-%d %H:%M:%S} UTC (Ctrl-C stops)")
        if args.json:
            print_json(result.sessions)
        elif args.live:
            print_table([live_row(s) for s in result.sessions], LIVE_COLUMNS)
        else:
            print_table(
                [s.model_dump() for s in result.sessions],
                [
                    "id", "location_name", "username", "device_name", "method", "state",
                    "authorized_at", "connected_at", "expires_at", "revoked_at", "revoke_reason",
                ],
            )
        if not args.watch:
            return 0
        try:
            await asyncio.sleep(args.interval)
        except asyncio.CancelledError:
            return 0


def split_list(text: str | None) -> list[str] | None:
    """`a,b` → [a, b]; an empty string clears the list; None leaves it unchanged."""
    if text is None:
        return None
    return [item.strip() for item in text.split(",") if item.strip()]


async def user_change(client: AdminClient, args: argparse.Namespace) -> int:
    result: rpc.UserChangeResult = await client.call(
        f"user_{args.action}", rpc.UserChangeRequest(username=args.username), rpc.UserChangeResult
    )
    if args.json:
        print_json(result)
        return 0
    done = {"disable": "disabled", "enable": "enabled", "delete": "deleted", "unlock": "unlocked"}[args.action]
    details = []
    if result.sessions_revoked:
        details.append(f"{result.sessions_revoked} session(s) revoked")
    if result.peers_removed:
        details.append(f"peers removed at {result.peers_removed} device location(s)")
    if result.peers_added:
        details.append(f"{result.peers_added} peer(s) put back at locations without MFA")
    print(f"user {args.username} {done}" + (f": {', '.join(details)}" if details else ""))
    return 0


async def user_set(client: AdminClient, args: argparse.Namespace) -> int:
    result: rpc.UserChangeResult = await client.call(
        "user_set", rpc.UserSetRequest(username=args.username, email=args.email), rpc.UserChangeResult
    )
    if args.json:
        print_json(result.user)
    else:
        print(f"user {result.user.username}: email {result.user.email}")
    return 0


async def user_show(client: AdminClient, args: argparse.Namespace) -> int:
    detail: rpc.UserDetail = await client.call("user_show", rpc.UserRef(username=args.username), rpc.UserDetail)
    if args.json:
        print_json(detail)
        return 0
    user, factors = detail.user, detail.factors
    print(f"user {user.username} (id {user.id}), {user.email}, {'active' if user.is_active else 'DISABLED'}")
    totp = "active" if factors.totp else "not set up"
    if factors.totp_pending:
        totp += " (a new secret waits for `totp confirm`)"
    print(f"  TOTP: {totp}")
    print(f"  email codes: {'on' if factors.email else 'off'}")
    print(f"  mobile keys: {', '.join(factors.mobile_keys) or 'none'}")
    if detail.hard_locked:
        lockout = "LOCKED until an administrator unlocks (`wgmfa admin user unlock`)"
    elif detail.locked_until and detail.locked_until > datetime.now(timezone.utc):
        lockout = (f"client address(es) locked out until {detail.locked_until:%Y-%m-%d %H:%M:%S} UTC "
                   "(`wgmfa admin user unlock`)")
    else:
        lockout = "not locked"
    print(f"  lockout: {lockout}, {detail.failed_attempts} failed factor(s) in a row")
    if detail.oidc_issuer or detail.oidc_subject:
        print(f"  OIDC: {detail.oidc_subject} at {detail.oidc_issuer}")
    print("devices:")
    print_table([d.model_dump() for d in detail.devices], ["device_id", "device_name", "location_name", "address", "pubkey"])
    print("live sessions:")
    print_table([live_row(s) for s in detail.sessions], LIVE_COLUMNS)
    return 0


async def totp_reset(client: AdminClient, args: argparse.Namespace) -> int:
    user: rpc.UserInfo = await client.call(
        "totp_reset", rpc.FactorRemoveRequest(username=args.username, force=args.force), rpc.UserInfo
    )
    if args.json:
        print_json(user)
    else:
        print(f"TOTP removed for {user.username}; set up a new one with `wgmfa admin totp enroll {user.username}`")
    return 0


async def mobile_remove(client: AdminClient, args: argparse.Namespace) -> int:
    result: rpc.DeviceChangeResult = await client.call(
        "mobile_remove",
        rpc.MobileRemoveRequest(username=args.username, device_name=args.device_name, force=args.force),
        rpc.DeviceChangeResult,
    )
    if args.json:
        print_json(result)
    else:
        print(f"the mobile key of {result.username}/{result.device_name} is removed")
    return 0


async def device_remove(client: AdminClient, args: argparse.Namespace) -> int:
    result: rpc.DeviceChangeResult = await client.call(
        "device_remove", rpc.DeviceRef(username=args.username, device_name=args.device_name), rpc.DeviceChangeResult
    )
    if args.json:
        print_json(result)
    else:
        print(f"device {args.device_name} of {result.username} removed from {result.peers_removed} location(s), "
              f"{result.sessions_revoked} session(s) revoked")
    return 0


async def device_rename(client: AdminClient, args: argparse.Namespace) -> int:
    result: rpc.DeviceChangeResult = await client.call(
        "device_rename",
        rpc.DeviceRenameRequest(username=args.username, device_name=args.device_name, new_name=args.new_name),
        rpc.DeviceChangeResult,
    )
    if args.json:
        print_json(result)
    else:
        print(f"device {args.device_name} of {result.username} is now {result.device_name}")
    return 0


def print_location_change(result: rpc.LocationChangeResult, verb: str) -> None:
    loc = result.location
    if not result.changes:
        print(f"location {loc.name}: nothing to change")
        return
    print(f"location {loc.name} {verb}")
    for key, (old, new) in result.changes.items():
        print(f"  {key}: {old} -> {new}")
    if result.sessions_revoked:
        print(f"  {result.sessions_revoked} session(s) revoked")
    if result.peers_removed:
        print(f"  {result.peers_removed} peer(s) removed from its gateways")
    if result.peers_reissued:
        print(f"  {result.peers_reissued} peer(s) issued anew")


async def location_set(client: AdminClient, args: argparse.Namespace) -> int:
    result: rpc.LocationChangeResult = await client.call(
        "location_set",
        rpc.LocationSetRequest(
            location=args.name, mfa_mode=args.mfa, threshold_s=args.threshold, lifetime_s=args.lifetime,
            keepalive_s=args.keepalive, endpoint=args.endpoint, network=args.network,
            allowed_ips=split_list(args.allowed_ips),
            dns=split_list(args.dns),
        ),
        rpc.LocationChangeResult,
    )
    if args.json:
        print_json(result)
        return 0
    print_location_change(result, "changed")
    if "listen_port" in result.changes or "network" in result.changes:
        print("  the gateways take the new port or address once restarted with new credentials (`wgmfa admin gateway add`)")
    if "network" in result.changes:
        print("  every device has a new address: give each its new config (`wgmfa admin device list`)")
    return 0


async def location_remove(client: AdminClient, args: argparse.Namespace) -> int:
    result: rpc.LocationChangeResult = await client.call(
        "location_remove", rpc.LocationRemoveRequest(location=args.name), rpc.LocationChangeResult
    )
    if args.json:
        print_json(result)
    else:
        print_location_change(result, "removed")
        print("  stop its gateways: they serve no one any more")
    return 0


async def revoke(client: AdminClient, args: argparse.Namespace) -> int:
    info: rpc.SessionInfo = await client.call("revoke", rpc.RevokeRequest(session_id=args.session_id), rpc.SessionInfo)
    if args.json:
        print_json(info)
    else:
        print(f"session {info.id} ({info.username}/{info.device_name} at {info.location_name}) revoked")
    return 0


async def oidc_set(client: AdminClient, args: argparse.Namespace) -> int:
    try:
        secret = Path(args.client_secret_file).read_text().strip()
    except OSError as exc:
        return fail(f"cannot read the client secret: {exc}", EXIT_ERROR)
    redirect_uri = args.redirect_uri or f"{os.environ.get('WGMFA_PUBLIC_URL', 'http://127.0.0.1:8080').rstrip('/')}/openid/mfa/callback"
    info: rpc.OidcProviderInfo = await client.call(
        "oidc_set",
        rpc.OidcProviderSetRequest(
            issuer=args.issuer, client_id=args.client_id, client_secret_sealed=await client.seal_for_core(secret),
            display_name=args.display_name, scopes=args.scopes, redirect_uri=redirect_uri,
        ),
        rpc.OidcProviderInfo,
    )
    if args.json:
        print_json(info)
    else:
        print(f"OpenID provider {info.issuer} set (client {info.client_id}, button \"Authenticate with {info.display_name}\")")
        print(f"register this redirect URI with the provider: {info.redirect_uri}")
    return 0


async def oidc_show(client: AdminClient, args: argparse.Namespace) -> int:
    info: rpc.OidcProviderInfo = await client.call("oidc_show", rpc.Empty(), rpc.OidcProviderInfo)
    if args.json:
        print_json(info)
    else:
        for key, value in info.model_dump().items():
            print(f"{key}: {', '.join(value) if isinstance(value, list) else fmt(value)}")
    return 0


async def oidc_unlink(client: AdminClient, args: argparse.Namespace) -> int:
    user: rpc.UserInfo = await client.call("oidc_unlink", rpc.UserChangeRequest(username=args.username), rpc.UserInfo)
    if args.json:
        print_json(user)
    else:
        print(f"{user.username} has no OpenID identity now; the next OIDC login binds one by verified email")
    return 0


def add_parser(subparsers: argparse._SubParsersAction, json_flag: argparse.ArgumentParser) -> None:
    actor_help = "the admin named in the audit trail (default: the operating-system user)"
    admin = subparsers.add_parser("admin", help="manage locations, users, devices and sessions", parents=[json_flag])
    admin.add_argument("--actor", help=actor_help)
    # every command takes --json and --actor after its own arguments too
    flags = argparse.ArgumentParser(add_help=False, parents=[json_flag])
    flags.add_argument("--actor", default=argparse.SUPPRESS, help=actor_help)
    areas = admin.add_subparsers(dest="area", required=True, metavar="AREA")

    location = areas.add_parser("location", help="WireGuard locations").add_subparsers(dest="action", required=True)
    p = location.add_parser("add", help="create a location", parents=[flags])
    p.add_argument("name")
    p.add_argument("--endpoint", required=True, help="HOST:PORT clients connect to")
    p.add_argument("--network", required=True, help="VPN network, e.g. 10.10.0.0/24")
    p.add_argument("--mfa", choices=["internal", "external", "disabled"], default="internal")
    p.add_argument("--threshold", type=int, help="peer disconnect threshold in seconds (default 300)")
    p.add_argument("--lifetime", type=int, help="absolute session lifetime in seconds (default 43200)")
    p.add_argument("--keepalive", type=int, help="persistent keepalive for clients in seconds (default 25)")
    p.add_argument("--allowed-ips", help="networks clients route through the gateway, CIDR, comma-separated")
    p.add_argument("--dns", help="DNS servers for clients, comma-separated")
    p.add_argument("--credentials-file", help="write the gateway credentials here (mode 0600) instead of printing them")
    p.set_defaults(run=location_add)
    p = location.add_parser("list", help="list locations", parents=[flags])
    p.set_defaults(run=location_list)
    p = location.add_parser("set", help="change a location; its devices follow at once", parents=[flags])
    p.add_argument("name", help="location name or id")
    p.add_argument("--mfa", choices=["internal", "external", "disabled"])
    p.add_argument("--threshold", type=int, help="peer disconnect threshold in seconds")
    p.add_argument("--lifetime", type=int, help="absolute session lifetime in seconds (new sessions)")
    p.add_argument("--keepalive", type=int, help="persistent keepalive for clients in seconds")
    p.add_argument("--endpoint", help="HOST:PORT clients connect to")
    p.add_argument("--network", help="a new VPN network: every device gets a new address")
    p.add_argument("--allowed-ips", help="routed networks, CIDR, comma-separated ('' for none)")
    p.add_argument("--dns", help="DNS servers, comma-separated ('' for none)")
    p.set_defaults(run=location_set)
    p = location.add_parser("remove", help="remove a location: every device leaves its gateways", parents=[flags])
    p.add_argument("name", help="location name or id")
    p.set_defaults(run=location_remove)

    gateway = areas.add_parser("gateway", help="gateway credentials").add_subparsers(dest="action", required=True)
    p = gateway.add_parser("add", help="write a location's gateway credentials file", parents=[flags])
    p.add_argument("location")
    p.add_argument("--output", "-o", help="file to write (default gateway-LOCATION.json)")
    p.set_defaults(run=gateway_add)

    user = areas.add_parser("user", help="users").add_subparsers(dest="action", required=True)
    p = user.add_parser("add", help="create a user", parents=[flags])
    p.add_argument("username")
    p.add_argument("--email", required=True)
    p.set_defaults(run=user_add)
    p = user.add_parser("list", help="list users", parents=[flags])
    p.set_defaults(run=user_list)
    for action, text in (
        ("disable", "disable a user: sessions end, peers leave every gateway, logins are refused"),
        ("enable", "enable a disabled user again"),
        ("delete", "delete a user and their devices (the audit trail stays)"),
        ("unlock", "lift a lockout after failed factors"),
    ):
        p = user.add_parser(action, help=text, parents=[flags])
        p.add_argument("username")
        p.set_defaults(run=user_change)
    p = user.add_parser("show", help="factors, devices, live sessions, lockout", parents=[flags])
    p.add_argument("username")
    p.set_defaults(run=user_show)
    p = user.add_parser("set", help="change a user", parents=[flags])
    p.add_argument("username")
    p.add_argument("--email")
    p.set_defaults(run=user_set)

    totp = areas.add_parser("totp", help="TOTP enrollment").add_subparsers(dest="action", required=True)
    p = totp.add_parser("enroll", help="make a new TOTP secret; prints the otpauth URI and its QR code once", parents=[flags])
    p.add_argument("username")
    p.set_defaults(run=totp_enroll)
    p = totp.add_parser("confirm", help="activate the enrolled secret with a code from the app", parents=[flags])
    p.add_argument("username")
    p.add_argument("code")
    p.set_defaults(run=totp_confirm)
    p = totp.add_parser("reset", help="remove a user's TOTP (enroll a new one afterwards)", parents=[flags])
    p.add_argument("username")
    p.add_argument("--force", action="store_true", help="even if it is the user's last second factor")
    p.set_defaults(run=totp_reset)

    email = areas.add_parser("email", help="email MFA").add_subparsers(dest="action", required=True)
    for action, text in (("enable", "let a user receive codes by email"), ("disable", "stop emailed codes for a user")):
        p = email.add_parser(action, help=text, parents=[flags])
        p.add_argument("username")
        if action == "disable":
            p.add_argument("--force", action="store_true", help="even if it is the user's last second factor")
        p.set_defaults(run=email_mfa)

    mobile = areas.add_parser("mobile", help="mobile app keys").add_subparsers(dest="action", required=True)
    p = mobile.add_parser("allow", help="let a device's phone app register its signing key (once)", parents=[flags])
    p.add_argument("username")
    p.add_argument("device_name")
    p.add_argument("--valid", type=int, default=3600, help="seconds the allowance lasts (default 3600)")
    p.set_defaults(run=mobile_allow)
    p = mobile.add_parser("remove", help="forget the signing key of a device's phone app", parents=[flags])
    p.add_argument("username")
    p.add_argument("device_name")
    p.add_argument("--force", action="store_true", help="even if it is the user's last second factor")
    p.set_defaults(run=mobile_remove)

    p = areas.add_parser("enroll", help="enrollment tokens for Defguard's apps and `wgmfa client enroll`",
                         parents=[flags])
    p.add_argument("target", metavar="USERNAME|list|revoke",
                   help="a user to issue a token for; `list` open tokens; `revoke ID|USERNAME`")
    p.add_argument("what", nargs="?", metavar="ID|USERNAME", help="for revoke: an enrollment id or a username")
    p.add_argument("--ttl", type=duration_s, default=86400, help="how long the token is valid, e.g. 2h, 7d (default 24h)")
    p.add_argument("--device-name", help="a name to suggest for the user's device")
    p.add_argument("--all", action="store_true", help="list: also used, expired and revoked tokens")
    p.add_argument("--url", default=os.environ.get("WGMFA_PUBLIC_URL", "http://127.0.0.1:8080"),
                   help="the proxy URL the apps reach (default $WGMFA_PUBLIC_URL or http://127.0.0.1:8080)")
    p.set_defaults(run=enroll)
    oidc = areas.add_parser("oidc", help="the OpenID provider for external MFA").add_subparsers(dest="action", required=True)
    p = oidc.add_parser("set", help="configure the provider (read from its discovery document)", parents=[flags])
    p.add_argument("--issuer", required=True, help="the provider's issuer URL")
    p.add_argument("--client-id", required=True)
    p.add_argument("--client-secret-file", required=True, help="a file holding the client secret")
    p.add_argument("--display-name", default="OpenID", help='shown as "Authenticate with NAME" (default OpenID)')
    p.add_argument("--scopes", default="openid email profile")
    p.add_argument("--redirect-uri", help="default $WGMFA_PUBLIC_URL/openid/mfa/callback")
    p.set_defaults(run=oidc_set)
    p = oidc.add_parser("show", help="show the provider (never its secret)", parents=[flags])
    p.set_defaults(run=oidc_show)
    p = oidc.add_parser("unlink", help="forget a user's OpenID identity", parents=[flags])
    p.add_argument("username")
    p.set_defaults(run=oidc_unlink)

    device = areas.add_parser("device", help="devices").add_subparsers(dest="action", required=True)
    p = device.add_parser("add", help="add a device to a location and print its config", parents=[flags])
    p.add_argument("username")
    p.add_argument("device_name")
    p.add_argument("--location", required=True, help="location name or id")
    p.add_argument("--pubkey", help="the device's WireGuard public key (default: make a key pair here)")
    p.add_argument("--output", "-o", help="write the device config here (mode 0600)")
    p.add_argument("--proxy-url", default=os.environ.get("WGMFA_PUBLIC_URL", "http://127.0.0.1:8080"),
                   help="the proxy URL the client talks to (default $WGMFA_PUBLIC_URL or http://127.0.0.1:8080)")
    p.set_defaults(run=device_add)
    p = device.add_parser("list", help="list devices and where they are", parents=[flags])
    p.add_argument("--user")
    p.set_defaults(run=device_list)
    p = device.add_parser("remove", help="remove a device: its peers leave every gateway", parents=[flags])
    p.add_argument("username")
    p.add_argument("device_name")
    p.set_defaults(run=device_remove)
    p = device.add_parser("rename", help="rename a device", parents=[flags])
    p.add_argument("username")
    p.add_argument("device_name")
    p.add_argument("new_name")
    p.set_defaults(run=device_rename)

    p = areas.add_parser("sessions", help="list VPN sessions, newest first", parents=[flags])
    p.add_argument("--location", help="location name or id")
    p.add_argument("--live", action="store_true",
                   help="only live sessions, with endpoint, latest handshake, traffic, idle deadline, time left")
    p.add_argument("--watch", action="store_true", help="with --live: refresh until Ctrl-C")
    p.add_argument("--interval", type=float, default=2.0, help="seconds between refreshes (default 2)")
    p.add_argument("--limit", type=int, default=100)
    p.set_defaults(run=sessions)

    p = areas.add_parser("revoke", help="revoke a session: the peer leaves every gateway", parents=[flags])
    p.add_argument("session_id", type=int)
    p.set_defaults(run=revoke)


async def run(args: argparse.Namespace) -> int:
    try:
        client = await AdminClient.connect(BusSettings(), getattr(args, "actor", None))
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
