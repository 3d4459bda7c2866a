"""Every benchmark runs once at a tiny size, so that none of them rots. Nothing about
speed is asserted here (that is what the benchmarks report); only that each runs through
and reports its figures."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest

from tests.support.postgres import PostgresUnavailable, _bin_dir
from tests.support.stack import REPO

TINY = {
    "login": ["--users", "4", "--floor", "20", "--concurrency", "2", "--wrk-users", "40", "--wrk-seconds", "1",
              "--wrk-floor-s", "1"],
    "reaper": ["--peers", "50", "--samples", "2"],
    "revoke": ["--peers", "3", "--backend", "fake"],
    "gateway": ["--sizes", "20", "--backend", "fake"],
    "memory": ["--sessions", "20", "--concurrency", "4", "--per-location", "15", "--step", "10"],
    "rpc": ["--requests", "40", "--concurrency", "2", "--clients", "2", "--rounds", "1"],
    "peer_log": ["--devices", "5", "--rounds", "1"],
    "consumer": ["--messages", "20", "--rate", "200", "--rounds", "1"],
}


def run_bench(name: str, *extra: str) -> dict:
    done = subprocess.run(
        [sys.executable, "-m", f"bench.{name}", *TINY[name], *extra, "--json"],
        cwd=REPO, capture_output=True, text=True, timeout=240,
    )
    assert done.returncode == 0, f"bench.{name} failed:\n{done.stdout}\n{done.stderr}"
    return json.loads(done.stdout)


def test_login_bench_runs_logins_and_both_floors() -> None:
    report = run_bench("login")
    names = [r["name"] for r in report["results"]]
    assert names[:3] == ["complete TOTP login (start + finish)", "http no-op (GET /api/v1/health)",
                         "nats request/reply no-op (core hello)"] and len(names) == (6 if shutil.which("wrk") else 4)
    assert all(r["operations"] > 0 and r["per_second"] > 0 for r in report["results"])
    assert 0 < report["login_vs_http_noop"] and 0 < report["login_vs_nats_noop"]
    assert all(r["core_cpu_ms_per_op"] >= 0 and 0 <= r["client_cpu"] for r in report["results"])
    if shutil.which("wrk"):  # the compiled generator ran logins with the Lua script, every one good
        wrk = next(r for r in report["results"] if r["name"].startswith("wrk: complete"))
        assert wrk["operations"] > 0 and wrk["failed"] == 0 and 0 < report["wrk_login_vs_http_noop"]


def test_login_bench_runs_on_postgresql_with_two_cores() -> None:
    try:
        _bin_dir()
    except PostgresUnavailable as exc:
        pytest.skip(str(exc))
    report = run_bench("login", "--postgres", "--core-processes", "2")
    assert report["database"] == "postgresql" and report["core_processes"] == 2
    assert report["postgres_settings"] == {"fsync": "on", "synchronous_commit": "on"}  # commits on disk, as measured
    # PostgreSQL's own CPU (server and backends) is measured with the services' (in clock
    # ticks: a tiny phase may show none, all of the logins together do)
    logins = [r for r in report["results"] if "login" in r["name"]]
    assert all(r["postgres_cpu_ms_per_op"] >= 0 for r in report["results"])
    assert sum(r["postgres_cpu_ms_per_op"] * r["operations"] for r in logins) > 0


def test_reaper_bench_ingests_every_sample() -> None:
    report = run_bench("reaper")
    assert report["peer_samples"] == 50 * 2 and report["reaper_replay_per_s"] > 0


def test_revoke_bench_removes_every_peer() -> None:
    report = run_bench("revoke")
    assert report["peers"] == 3 and report["all_removed_after_s"] > 0


def test_gateway_bench_resyncs() -> None:
    report = run_bench("gateway")
    assert [r["peers"] for r in report["results"]] == [20]
    assert report["results"][0]["healthy_peers_written"] == 0


def test_memory_bench_holds_the_sessions_it_made() -> None:
    report = run_bench("memory")
    assert report["newest_listed_live"] == 20 and report["core_rss_mib"] > 0 and report["rss_vs_idle"] > 0


def test_rpc_bench_measures_both_handlers() -> None:
    report = run_bench("rpc")
    assert report["raw_per_second"] > 0 and report["faststream_per_second"] > 0 and report["faststream_vs_raw"] > 0


def test_peer_log_bench_publishes_both_ways() -> None:
    report = run_bench("peer_log")
    for kind in ("read then publish", "remembered"):
        (run,) = report["rounds"][kind]
        assert run["states"] == 10 and run["per_second"] > 0 and run["cpu_us_per_state"] >= 0
    assert report["cpu_ratio"] >= 0 and report["p50_ratio"] > 0


def test_consumer_bench_consumes_every_message_both_ways() -> None:
    report = run_bench("consumer")
    for load in ("one by one", "backlog"):
        for kind in ("pull, one fetch per message", "durable consumer"):
            (run,) = report["rounds"][load][kind]
            assert run["messages"] == 20 and run["per_second"] > 0 and run["consumer_cpu_us"] >= 0
        assert report["ratios"][load]["consumer_cpu_us"] >= 0
