"""Helpers the benchmarks share: a throwaway nats-server and percentiles."""
from __future__ import annotations

import contextlib
import shutil
import statistics
import tempfile
from collections.abc import Iterator
from pathlib import Path

from events.server import NatsServer


@contextlib.contextmanager
def nats_server() -> Iterator[NatsServer]:
    directory = Path(tempfile.mkdtemp(prefix="wgmfa-bench-"))
    server = NatsServer(directory)
    server.start()
    try:
        yield server
    finally:
        server.stop()
        shutil.rmtree(directory, ignore_errors=True)


def percentiles(values: list[float]) -> dict[str, float]:
    ordered = sorted(values)
    return {
        "p50_ms": statistics.median(ordered) * 1000,
        "p99_ms": ordered[max(0, int(len(ordered) * 0.99) - 1)] * 1000,
        "max_ms": ordered[-1] * 1000,
    }
