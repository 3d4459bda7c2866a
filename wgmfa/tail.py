"""`wgmfa events tail`: follow the audit trail (or any wgmfa stream) live.

It reads through an ordered consumer of its own (events.nats_direct: one of the places
FastStream has no API for): it starts where it is told (all, since a time, or new) and
leaves nothing behind on the server."""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import sys
from datetime import datetime, timedelta, timezone

from faststream.nats import DeliverPolicy

from events import nats_direct, permissions, streams, subjects
from events.bus import Bus, BusUnavailable
from runtime.settings import BusSettings
from wgmfa.output import fail

ENVELOPE = {"event_id", "type", "version", "occurred_at"}
_DURATION = re.compile(r"^(\d+)([smhd])$")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_duration(text: str) -> timedelta:
    match = _DURATION.match(text)
    if not match:
        raise argparse.ArgumentTypeError(f"not a duration (like 30s, 10m, 2h, 1d): {text}")
    return timedelta(seconds=int(match.group(1)) * _UNITS[match.group(2)])


def stream_for(filter_subject: str) -> str:
    for config in streams.ALL_STREAMS:
        prefix = config.subjects[0].removesuffix(">")
        if filter_subject.startswith(prefix):
            return config.name  # type: ignore[return-value]
    raise ValueError(f"{filter_subject} is not inside one wgmfa stream (events, dlq, peer or stats)")


def readable(subject: str, data: bytes) -> str:
    """One line per event: time, type, then the body as key=value."""
    try:
        event = json.loads(data)
    except ValueError:
        return f"{subject} (not JSON, {len(data)} bytes)"
    if not isinstance(event, dict):
        return f"{subject} {data[:200]!r}"
    when = str(event.get("occurred_at", ""))[:23].replace("T", " ")
    parts = []
    for key, value in event.items():
        if key in ENVELOPE or value is None:
            continue
        if key.endswith("_sealed"):
            value = "(sealed)"
        elif isinstance(value, (dict, list)):
            value = json.dumps(value, separators=(",", ":"))
        parts.append(f"{key}={value}")
    return f"{when} {event.get('type', subject):<22} {' '.join(parts)}"


async def tail(args: argparse.Namespace) -> int:
    filter_subject = subjects.events_filter(args.filter)
    try:
        stream = stream_for(filter_subject)
    except ValueError as exc:
        return fail(str(exc), 2)
    try:
        settings = BusSettings()
        bus = await Bus.connect_as(settings, permissions.OPERATOR, "wgmfa-tail", wait_s=3)
    except BusUnavailable as exc:
        return fail(f"{exc} (is `wgmfa up` running? set WGMFA_NATS_URL)", 3)
    start_time = None
    if args.all:
        policy = DeliverPolicy.ALL
    elif args.since:
        policy = DeliverPolicy.BY_START_TIME
        start_time = (datetime.now(timezone.utc) - args.since).isoformat()
    else:
        policy = DeliverPolicy.NEW
    queue: asyncio.Queue[nats_direct.StreamMsg] = asyncio.Queue()

    async def on_message(msg: nats_direct.StreamMsg) -> None:
        await queue.put(msg)

    try:
        await nats_direct.ordered_subscribe(bus.broker, filter_subject, stream, policy, cb=on_message,
                                          opt_start_time=start_time)
        if not args.json:
            print(f"# following {filter_subject} on {stream} (Ctrl-C to stop)", flush=True)
        shown = 0
        connected = True
        while args.count is None or shown < args.count:
            try:
                msg = await asyncio.wait_for(queue.get(), CONNECTION_CHECK_S)
            except asyncio.TimeoutError:
                if connected != bus.connected:
                    connected = bus.connected
                    print(f"wgmfa: {'reconnected to' if connected else 'lost the connection to'} NATS at "
                          f"{settings.nats_url}{'' if connected else '; waiting for it to come back (Ctrl-C to stop)'}",
                          file=sys.stderr, flush=True)
                continue
            if args.json:
                print(msg.data.decode(errors="replace"), flush=True)
            else:
                print(readable(msg.subject, msg.data), flush=True)
            shown += 1
    except BrokenPipeError:
        # the reader went away (`wgmfa events tail | head`): that is the end, not an error
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (KeyboardInterrupt, asyncio.CancelledError):
        pass
    finally:
        await bus.close()
    return 0


CONNECTION_CHECK_S = 0.5


def add_parser(subparsers: argparse._SubParsersAction, json_flag: argparse.ArgumentParser) -> None:
    events = subparsers.add_parser("events", help="the event streams").add_subparsers(dest="action", required=True)
    p = events.add_parser("tail", help="print events live, one line each", parents=[json_flag])
    p.add_argument("filter", nargs="?", help="e.g. mfa.* or session.> (under wgmfa.events), or a full subject like wgmfa.dlq.>")
    group = p.add_mutually_exclusive_group()
    group.add_argument("--all", action="store_true", help="start from the oldest stored event")
    group.add_argument("--since", type=parse_duration, help="start this long ago, e.g. 10m")
    p.add_argument("--count", type=int, help="stop after this many events")
    p.set_defaults(run=tail)
