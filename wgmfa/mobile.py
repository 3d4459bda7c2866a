"""`wgmfa mobile`: acts as the phone app, with an Ed25519 key in a file: registers the key
for a device, and approves a desktop's login from its QR code."""
from __future__ import annotations

import argparse
import base64
import binascii
import json
import os
from pathlib import Path
from typing import Any

import httpx
from nacl.signing import SigningKey

from wgmfa.output import fail


def load_key(path: Path, *, create: bool = False) -> SigningKey:
    """The phone's signing key; made (mode 0600) when asked and missing."""
    if path.exists():
        try:
            return SigningKey(base64.b64decode(json.loads(path.read_text())["seed"], validate=True))
        except (ValueError, KeyError, binascii.Error) as exc:
            raise SystemExit(fail(f"{path} is not a wgmfa mobile key file: {exc}", 2)) from None
    if not create:
        raise SystemExit(fail(f"no key file {path}: run `wgmfa mobile register` first", 2))
    key = SigningKey.generate()
    document = {"seed": base64.b64encode(bytes(key)).decode(), "public_key": public_key(key)}
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as handle:
        json.dump(document, handle)
    return key


def public_key(key: SigningKey) -> str:
    return base64.b64encode(bytes(key.verify_key)).decode()


def sign(key: SigningKey, challenge: str) -> str:
    return base64.b64encode(key.sign(challenge.encode()).signature).decode()


def qr_payload(token: str, challenge: str, instance_id: str) -> str:
    """What the desktop shows as a QR code: base64 of {"token", "challenge", "instance_id"}."""
    return base64.b64encode(json.dumps({"token": token, "challenge": challenge, "instance_id": instance_id}).encode()).decode()


def read_qr_payload(payload: str) -> dict[str, Any]:
    try:
        document = json.loads(base64.b64decode(payload.strip(), validate=True))
        if not all(isinstance(document.get(k), str) for k in ("token", "challenge")):
            raise ValueError("token and challenge missing")
        return document
    except (ValueError, binascii.Error) as exc:
        raise SystemExit(fail(f"not a wgmfa approval QR payload: {exc}", 2)) from None


async def post(proxy_url: str, route: str, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
    async with httpx.AsyncClient(base_url=proxy_url, timeout=30) as http:
        try:
            response = await http.post(route, json=body)
        except httpx.HTTPError as exc:
            raise SystemExit(fail(f"cannot reach the proxy at {proxy_url}: {exc}", 3)) from None
    if not response.content:
        return response.status_code, {}
    try:
        return response.status_code, response.json()
    except ValueError:
        return response.status_code, {"error": response.text[:200]}


async def register(args: argparse.Namespace) -> int:
    config = json.loads(Path(args.config).read_text())
    key = load_key(Path(args.key_file), create=True)
    proxy = args.proxy_url or config.get("proxy_url") or "http://127.0.0.1:8080"
    status, body = await post(proxy, "/api/v1/enrollment/register_mobile",
                              {"auth_pub_key": public_key(key), "device_pub_key": config["pubkey"], "code": args.code})
    if status != 200:
        return fail(f"registration refused ({status}): {body.get('error')}")
    print(f"registered this phone's key {public_key(key)} for device {config.get('device_name', config['pubkey'])}")
    return 0


async def approve(args: argparse.Namespace) -> int:
    request = read_qr_payload(args.payload)
    key = load_key(Path(args.key_file))
    proxy = args.proxy_url
    if not proxy and args.config:
        proxy = json.loads(Path(args.config).read_text()).get("proxy_url")
    proxy = proxy or "http://127.0.0.1:8080"
    status, body = await post(proxy, "/api/v1/client-mfa/finish-remote",
                              {"token": request["token"], "code": sign(key, request["challenge"]),
                               "auth_pub_key": public_key(key)})
    if status != 200:
        return fail(f"approval refused ({status}): {body.get('error')}")
    print("approved")
    return 0


def add_parser(subparsers: argparse._SubParsersAction, _json_flag: argparse.ArgumentParser) -> None:
    mobile = subparsers.add_parser("mobile", help="act as the phone app (a signing key in a file)").add_subparsers(dest="action", required=True)
    p = mobile.add_parser("register", help="make a signing key and register it for the phone's device")
    p.add_argument("--config", required=True, help="the phone's device config (`wgmfa admin device add -o`)")
    p.add_argument("--key-file", required=True, help="the phone's signing key (made if missing)")
    p.add_argument("--code", required=True, help="the one-time code `wgmfa admin mobile allow` printed")
    p.add_argument("--proxy-url")
    p.set_defaults(run=register)
    p = mobile.add_parser("approve", help="approve a desktop's login from its QR payload")
    p.add_argument("payload", help="the text of the QR code the desktop shows")
    p.add_argument("--key-file", required=True)
    p.add_argument("--config", help="the phone's device config, for its proxy URL")
    p.add_argument("--proxy-url")
    p.set_defaults(run=approve)
