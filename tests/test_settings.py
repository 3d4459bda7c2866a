"""Settings that make no sense are refused at start, with the reason, by every process."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests.support.stack import REPO

CASES = [
    ("core_service", {"WGMFA_STATS_INTERVAL": "0"}, "WGMFA_STATS_INTERVAL: Input should be greater than 0"),
    ("core_service", {"WGMFA_STATS_INTERVAL": "200"},
     "WGMFA_DEFAULT_THRESHOLD_S (300 s) is below the threshold floor of 580 s"),
    ("core_service", {"WGMFA_MIN_THRESHOLD_S": "-5"}, "WGMFA_MIN_THRESHOLD_S: Input should be greater than 0"),
    ("core_service", {"WGMFA_MAX_FAILED_ATTEMPTS": "0"}, "WGMFA_MAX_FAILED_ATTEMPTS: Input should be greater than or equal to 1"),
    ("core_service", {"WGMFA_EVENTS_MAX_BYTES": "0"}, "WGMFA_EVENTS_MAX_BYTES"),
    ("reaper_worker", {"WGMFA_SWEEP_INTERVAL_S": "0"}, "WGMFA_SWEEP_INTERVAL_S: Input should be greater than 0"),
    ("reaper_worker", {"WGMFA_STATS_INTERVAL": "-1"}, "WGMFA_STATS_INTERVAL: Input should be greater than 0"),
    ("proxy_service", {"WGMFA_PROXY_PORT": "70000"}, "WGMFA_PROXY_PORT: Input should be less than or equal to 65535"),
    ("proxy_service", {"WGMFA_RATE_LIMIT_BURST": "0"}, "WGMFA_RATE_LIMIT_BURST"),
    ("gateway_worker", {"WGMFA_STATS_INTERVAL": "0"}, "WGMFA_STATS_INTERVAL: Input should be greater than 0"),
    ("core_service", {"WGMFA_CORE_METRICS_PORT": "0"}, "WGMFA_CORE_METRICS_PORT: Input should be greater than or equal to 1"),
    ("reaper_worker", {"WGMFA_REAPER_METRICS_PORT": "65536"},
     "WGMFA_REAPER_METRICS_PORT: Input should be less than or equal to 65535"),
    ("gateway_worker", {"WGMFA_GATEWAY_METRICS_PORT": "http"}, "WGMFA_GATEWAY_METRICS_PORT: Input should be a valid integer"),
    ("wgmfa up", {"WGMFA_STREAM_REPLICAS": "0"}, "WGMFA_STREAM_REPLICAS: Input should be greater than or equal to 1"),
]


@pytest.mark.parametrize(("program", "settings", "reason"), CASES, ids=[f"{p}-{next(iter(s))}" for p, s, _ in CASES])
def test_nonsense_settings_are_refused_at_start_with_the_reason(program: str, settings: dict[str, str], reason: str,
                                                                tmp_path) -> None:  # type: ignore[no-untyped-def]
    env = {k: v for k, v in os.environ.items() if not k.startswith("WGMFA_")}
    # nothing is reachable: a process that accepted the settings would wait for NATS, not exit
    env.update(WGMFA_NATS_URL="nats://127.0.0.1:1", WGMFA_STATE_DIR=str(tmp_path), **settings)
    argv = [sys.executable, "-m", *(["wgmfa", "up"] if program == "wgmfa up" else [program])]
    done = subprocess.run(argv, env=env, cwd=REPO, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2, (done.returncode, done.stderr[-2000:])
    assert "wgmfa: settings refused:" in done.stderr and reason in done.stderr, done.stderr
    assert "Traceback" not in done.stderr


def test_a_service_told_to_stop_while_it_waits_for_nats_stops(tmp_path) -> None:  # type: ignore[no-untyped-def]
    env = {k: v for k, v in os.environ.items() if not k.startswith("WGMFA_")}
    env.update(WGMFA_NATS_URL="nats://127.0.0.1:1", WGMFA_STATE_DIR=str(tmp_path))
    for _ in range(3):  # the stop lands at a different point of its attempts each time
        with subprocess.Popen([sys.executable, "-m", "reaper_worker"], env=env, cwd=REPO, stderr=subprocess.PIPE,
                              text=True) as process:
            try:
                assert process.stderr is not None
                for line in process.stderr:
                    if "reaper starting" in line:
                        break
            finally:
                process.terminate()
                try:
                    code = process.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    process.kill()
                    raise
            assert code == 0
