"""The core's memory with many live VPN sessions, each made through the data path: a user
with TOTP and a device created by the admin RPCs, then a complete login over the proxy's
HTTP API (not rows inserted by SQL).

    .venv/bin/python -m bench.memory [--sessions 2000] [--concurrency 16] [--postgres]

Reports the core's resident set (VmRSS) idle after start, after the users exist, and with
every session live, as a ratio to the idle figure of the same run, and the growth per live
session.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

import pyotp

from bench.common import nats_server, run_benchmark
from bench.login import HttpConnection, run_concurrently
from schemas import rpc
from tests.support.postgres import PostgresCluster
from tests.support.stack import Stack


LISTED = 200  # sessions the administrator's listing checks (a larger listing is slow)


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for process {pid}")


async def main(args: argparse.Namespace) -> dict:
    with nats_server() as nats:
        work = Path(tempfile.mkdtemp(prefix="wgmfa-bench-"))
        cluster = None
        database_url = None
        if args.postgres:
            cluster = PostgresCluster(work / "pg")
            cluster.start()
            database_url = cluster.create_database("bench")
        stack = Stack(nats.url, work, database_url=database_url, rate_limit_per_s="0", log_level="WARNING", sqlite_inline="true")
        try:
            await stack.start()
            assert stack.core.process is not None
            pid = stack.core.process.pid
            # Devices spread over locations of at most --per-location: placing a device scans
            # its location's addresses, so one location of 100 000 would take hours to fill.
            location_count = -(-args.sessions // args.per_location)
            locations = [
                (await stack.add_location(f"bench{n}", network=f"10.{64 + n // 16}.{(n % 16) * 16}.0/20")).location
                for n in range(location_count)
            ]
            started_mib = rss_mib(pid)
            print(f"idle: {started_mib:.1f} MiB; {args.sessions} users with TOTP and a device, each logged in,"
                  f" in steps of {args.step}...", file=sys.stderr)
            users: list[tuple[str, str]] = [("", "")] * args.sessions

            async def create(i: int, _connection: object) -> None:
                secret = await stack.add_user_with_totp(f"u{i}")
                _, device = await stack.add_device(f"u{i}", "laptop", locations[i // args.per_location].name)
                users[i] = (secret, device.pubkey)

            async def login(i: int, http: HttpConnection) -> None:
                secret, pubkey = users[i]
                location_id = locations[i // args.per_location].id
                status, body = await http.request(
                    "POST", "/api/v1/client-mfa/start", {"location_id": location_id, "pubkey": pubkey, "method": 0}
                )
                token = json.loads(body)["token"]
                status, body = await http.request("POST", "/api/v1/client-mfa/finish", {"token": token, "code": pyotp.TOTP(secret).now()})
                if status != 200:
                    raise RuntimeError(f"login {i} failed: {status} {body!r}")

            steps = []
            for first in range(0, args.sessions, args.step):
                count = min(args.step, args.sessions - first)
                await run_concurrently(count, args.concurrency, lambda i, c: create(first + i, c))
                await run_concurrently(count, args.concurrency, lambda i, c: login(first + i, c), stack.proxy_url)
                steps.append({"live_sessions": first + count, "core_rss_mib": rss_mib(pid)})
                print(f"  {first + count} live sessions: {steps[-1]['core_rss_mib']:.1f} MiB"
                      f" ({steps[-1]['core_rss_mib'] / started_mib:.2f} x idle)", file=sys.stderr)
            sessions_mib = rss_mib(pid)
            assert stack.admin is not None
            listed = await stack.admin.call(
                "sessions", rpc.SessionsRequest(include_revoked=False, limit=min(args.sessions, LISTED)), rpc.SessionsResult
            )
            return {
                "database": "postgresql" if args.postgres else "sqlite",
                "live_sessions": args.sessions,
                # the newest ones, as the administrator lists them: all live
                "newest_listed_live": sum(1 for s in listed.sessions if s.state == "authorized"),
                "core_rss_mib": sessions_mib,
                "core_rss_started_mib": started_mib,
                "bytes_per_live_session_and_user": (sessions_mib - started_mib) * 1024 * 1024 / args.sessions,
                "rss_vs_idle": sessions_mib / started_mib,
                "locations": location_count,
                "steps": steps,
            }
        finally:
            await stack.stop()
            if cluster:
                cluster.stop()
            shutil.rmtree(work, ignore_errors=True)


def cli() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sessions", type=int, default=2000, help="live sessions to create (one user and device each)")
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--per-location", type=int, default=1000, help="devices per location")
    parser.add_argument("--step", type=int, default=10_000, help="report the RSS after every this many sessions")
    parser.add_argument("--postgres", action="store_true", help="core on a throwaway PostgreSQL instead of SQLite")
    run_benchmark(parser, main, show)


def show(report: dict) -> None:
    print(f"database {report['database']}: core RSS {report['core_rss_mib']:.1f} MiB with {report['live_sessions']} live sessions")
    print(f"  idle at start {report['core_rss_started_mib']:.1f} MiB: ratio {report['rss_vs_idle']:.2f};"
          f" {report['bytes_per_live_session_and_user']:.0f} bytes per live session (with its user and device),"
          f" {report['locations']} locations")


if __name__ == "__main__":
    cli()
