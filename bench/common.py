"""Helpers the benchmarks share."""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import statistics
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path

from wgmfa.nats_server import temporary_nats_server

nats_server = temporary_nats_server


@contextlib.contextmanager
def wireguard_place(requested: str | None) -> Iterator[tuple[str, str | None]]:
    """(backend kind, network namespace): as root, real wireguard-go in a namespace of its
    own; otherwise the in-memory fake."""
    kind = requested or ("userspace" if os.geteuid() == 0 else "fake")
    if kind != "userspace":
        yield kind, None
        return
    from tests.support.netns import Topology

    with Topology() as topology:
        yield kind, topology.gateway


def proc_stat(pid: int | str) -> list[str]:
    """/proc/PID/stat's fields after the command name (the first is the state)."""
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()


def process_cpu_seconds(pid: int) -> float:
    """CPU time (user + system) a process has used so far."""
    fields = proc_stat(pid)
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def percentiles(values: list[float]) -> dict[str, float]:
    ordered = sorted(values)
    return {
        "p50_ms": statistics.median(ordered) * 1000,
        "p99_ms": ordered[max(0, int(len(ordered) * 0.99) - 1)] * 1000,
        "max_ms": ordered[-1] * 1000,
    }


def run_benchmark(
    parser: argparse.ArgumentParser,
    main: Callable[[argparse.Namespace], Awaitable[dict]],
    show: Callable[[dict], None],
) -> None:
    """Parse the arguments (adding --json), run, and print the report."""
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    args = parser.parse_args()
    report = asyncio.run(main(args))
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        show(report)
