"""The `wgmfa` command line."""
from __future__ import annotations

import argparse
import asyncio
import logging
import sys

from wgmfa import admin, client, mobile, tail, up


def build_parser() -> argparse.ArgumentParser:
    json_flag = argparse.ArgumentParser(add_help=False)
    json_flag.add_argument("--json", action="store_true", default=argparse.SUPPRESS, help="machine-readable output")
    parser = argparse.ArgumentParser(prog="wgmfa", description="MFA in front of WireGuard, over NATS")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    up.add_parser(commands, json_flag)
    admin.add_parser(commands, json_flag)
    tail.add_parser(commands, json_flag)
    client.add_parser(commands, json_flag)
    mobile.add_parser(commands, json_flag)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if not hasattr(args, "json"):
        args.json = False
    logging.basicConfig(level=logging.ERROR, format="wgmfa: %(message)s")
    if getattr(args, "sync", False):
        return args.run(args)
    runner = admin.run if args.command == "admin" else args.run
    try:
        return asyncio.run(runner(args))
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
