"""The bus's contract as an AsyncAPI 3 document, made from the services' own routers and
publishers: every subject a service subscribes to or publishes on, with its payload schema.

    python -m wgmfa.contract            # writes docs/asyncapi.yaml
    python -m wgmfa.contract --check    # fails when docs/asyncapi.yaml differs from the code

`faststream docs gen wgmfa.contract:app --yaml` gives FastStream's own document of the same
application; this command adds what FastStream 0.7 does not document: the reply of every
RPC endpoint (`RpcReply` with its typed `result`), as AsyncAPI 3 operation replies.
"""
from __future__ import annotations

import argparse
import base64
import difflib
import sys
from pathlib import Path
from typing import Any
from urllib.parse import unquote

import yaml
from faststream import FastStream
from faststream.nats import NatsBroker
from faststream.nats.security import NatsNKey
from faststream.specification import AsyncAPI
from pydantic import BaseModel, create_model

from core_service import VERSION
from core_service.app import Core
from core_service.settings import CoreSettings
from events.bus import Bus, RpcRouter
from gateway_worker.app import Gateway
from gateway_worker.settings import GatewaySettings
from proxy_service.remote import ApprovalWakeups
from schemas.rpc import GatewayCredentials, RpcError
from schemas.sealing import generate_keypair

DOCUMENT = Path(__file__).resolve().parent.parent / "docs" / "asyncapi.yaml"
_SCHEMAS = "#/components/schemas/"


def _routers(bus: Bus) -> list[Any]:
    # a core and a gateway that are never started: their handlers are declared over this
    # bus, and nothing connects
    settings = CoreSettings(secret_key=base64.b64encode(bytes(32)).decode(), database_url="sqlite+aiosqlite://")
    private, public = generate_keypair()
    credentials = GatewayCredentials(
        location_id=1, location_name="documented", private_key=private, sealing_private_key=private, listen_port=51820,
        address="10.0.0.1/24", network="10.0.0.0/24", mfa_required=True, core_signing_key=public,
    )
    gateway = Gateway(GatewaySettings(gateway_id="documented"), credentials, backend=None)  # type: ignore[arg-type]
    return [*Core(settings).build(bus), *gateway.build(bus), ApprovalWakeups().router(bus)]


def build_app() -> tuple[FastStream, list[Any]]:
    broker = NatsBroker(
        "nats://nats:4222",
        security=NatsNKey.from_seed("each role's NKey seed"),
        description="wgmfa's bus: request/reply with the core, the peer log, gateway stats, the audit trail "
        "and the dead letters. Every connection authenticates with its role's NKey.",
        logger=None,
        apply_types=False,  # as Bus.connect makes it
    )
    bus = Bus(broker, "contract")
    routers = _routers(bus)
    for router in routers:
        broker.include_router(router)
    application = FastStream(broker, specification=AsyncAPI(title="wgmfa", version=VERSION, schema_version="3.0.0"))
    return application, routers


app, routers = build_app()


def _reply_model(result: type[BaseModel] | None) -> type[BaseModel]:
    name = f"{result.__name__}Reply" if result is not None else "EmptyReply"
    return create_model(  # the envelope RpcReply, with its result typed
        name,
        __doc__=f"ok: true with the result, or ok: false with the error ({name[:-5]}).",
        ok=(bool, ...),
        result=(result | None, None) if result is not None else (dict | None, None),
        error=(RpcError | None, None),
    )


def document() -> dict[str, Any]:
    spec: dict[str, Any] = app.schema.to_specification().to_jsonable()
    for name, channel in spec.get("channels", {}).items():
        if "{" in name:  # a subject with variable parts: documented by its template
            channel["address"] = channel["bindings"]["nats"]["subject"] = name
    schemas = spec.setdefault("components", {}).setdefault("schemas", {})
    messages = spec["components"].setdefault("messages", {})
    replies = {subject: result for router in routers if isinstance(router, RpcRouter)
               for subject, result in router.replies.items()}
    for name, operation in spec.get("operations", {}).items():
        channel = spec["channels"][unquote(operation["channel"]["$ref"].rsplit("/", 1)[-1])]
        subject = channel["address"]
        if operation.get("action") != "receive" or subject not in replies:
            continue
        model = _reply_model(replies[subject])
        schema = model.model_json_schema(ref_template=_SCHEMAS + "{model}")
        schemas.update(schema.pop("$defs", {}))
        schemas[model.__name__] = schema
        message = f"{subject}:Reply"
        messages[message] = {"title": message, "payload": {"$ref": _SCHEMAS + model.__name__}}
        operation["reply"] = {"messages": [{"$ref": f"#/components/messages/{message}"}]}
    return spec


def render() -> str:
    return yaml.safe_dump(document(), sort_keys=True, allow_unicode=True, width=100)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m wgmfa.contract", description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="fail when the checked-in document differs")
    parser.add_argument("--output", type=Path, default=DOCUMENT)
    args = parser.parse_args(argv)
    text = render()
    if args.check:
        current = args.output.read_text() if args.output.exists() else ""
        if current != text:
            sys.stdout.writelines(difflib.unified_diff(
                current.splitlines(True), text.splitlines(True), str(args.output), "generated", n=1))
            print(f"\n{args.output} is out of date: run `python -m wgmfa.contract`", file=sys.stderr)
            return 1
        return 0
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(text)
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
