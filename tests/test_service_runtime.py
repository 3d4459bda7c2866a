"""The process plumbing every service runs under (runtime.service), in a fresh interpreter:
what it does to the process once the service has started."""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

from runtime.service import YOUNG_GENERATION_THRESHOLD

ROOT = Path(__file__).resolve().parents[1]

# A service that reports the collector's state while it starts and once it runs, then
# stops itself as SIGTERM would.
SERVICE = textwrap.dedent(
    """
    import asyncio, gc, json, os, signal, types
    from runtime.service import run_until_signalled

    class Service:
        async def start(self):
            self.starting = {"frozen": gc.get_freeze_count(), "young": gc.get_threshold()[0]}
            self.kept = [[n] for n in range(1000)]  # made by the start: kept out of collections
            asyncio.get_running_loop().call_later(0.2, self.report)

        def report(self):
            made = [[n] for n in range(1000)]  # made while running: collected as before
            collected = {id(o) for o in gc.get_objects()}  # what collections look at
            print(json.dumps({
                "starting": self.starting,
                "running": {"frozen": gc.get_freeze_count(), "young": gc.get_threshold()[0]},
                "start's objects collected": any(id(o) in collected for o in self.kept),
                "new objects collected": all(id(o) in collected for o in made),
            }), flush=True)
            os.kill(os.getpid(), signal.SIGTERM)

        async def stop(self):
            pass

    asyncio.run(run_until_signalled("test", types.SimpleNamespace(log_level="WARNING"), Service()))
    """
)


def test_a_started_service_keeps_what_its_start_made_out_of_garbage_collections() -> None:
    """Full collections of a service's start-up heap (215 000 objects in the core) stopped
    its loop for about 110 ms every few seconds under load: once started, a service takes
    them out of collections and collects its young generation less often; what it makes
    afterwards is still collected."""
    done = subprocess.run([sys.executable, "-c", SERVICE], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["starting"]["frozen"] == 0  # CPython's defaults while starting
    assert report["starting"]["young"] != YOUNG_GENERATION_THRESHOLD
    assert report["running"]["frozen"] > 1000
    assert report["running"]["young"] == YOUNG_GENERATION_THRESHOLD
    assert report["start's objects collected"] is False
    assert report["new objects collected"] is True
