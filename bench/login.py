"""Complete TOTP logins per second through the proxy's HTTP API, against the bare floor
measured in the same run: an HTTP no-op (GET /api/v1/health on the same proxy) and a
NATS request/reply no-op (the core's hello RPC).

    .venv/bin/python -m bench.login [--users 400] [--concurrency 16] [--postgres]

Each TOTP time step is accepted once per user, so every login is a different user; the
users are created before the clock starts.
"""
from __future__ import annotations

import argparse
import asyncio
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx
import pyotp

from bench.common import run_benchmark
from events import subjects
from events.bus import Bus
from events.server import NatsServer
from schemas import rpc
from tests.support.postgres import PostgresCluster
from tests.support.stack import Stack


async def run_concurrently(count: int, concurrency: int, job) -> tuple[float, list[float]]:  # type: ignore[no-untyped-def]
    """Runs job(i) for i < count with `concurrency` workers; (elapsed seconds, latencies)."""
    queue: asyncio.Queue[int] = asyncio.Queue()
    for i in range(count):
        queue.put_nowait(i)
    latencies: list[float] = []

    async def worker() -> None:
        while True:
            try:
                i = queue.get_nowait()
            except asyncio.QueueEmpty:
                return
            began = time.perf_counter()
            await job(i)
            latencies.append(time.perf_counter() - began)

    began = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return time.perf_counter() - began, latencies


def summary(name: str, count: int, elapsed: float, latencies: list[float]) -> dict:
    ordered = sorted(latencies)
    return {
        "name": name,
        "operations": count,
        "per_second": count / elapsed,
        "p50_ms": statistics.median(ordered) * 1000,
        "p99_ms": ordered[int(len(ordered) * 0.99) - 1] * 1000,
    }


async def main(args: argparse.Namespace) -> dict:
    work = Path(tempfile.mkdtemp(prefix="wgmfa-bench-"))
    nats = NatsServer(work / "nats")
    nats.start()
    cluster = None
    database_url = None
    if args.postgres:
        cluster = PostgresCluster(work / "pg")
        cluster.start()
        database_url = cluster.create_database("bench")
    stack = Stack(nats.url, work, database_url=database_url, rate_limit_per_s="0", log_level="WARNING")
    try:
        await stack.start()
        location = (await stack.add_location("bench", network="10.64.0.0/16")).location
        print(f"creating {args.users} users with TOTP and a device...", file=sys.stderr)
        users: list[tuple[str, str]] = [("", "")] * args.users

        async def create(i: int) -> None:
            secret = await stack.add_user_with_totp(f"u{i}")
            _, device = await stack.add_device(f"u{i}", "laptop", "bench")
            users[i] = (secret, device.pubkey)

        await run_concurrently(args.users, args.concurrency, create)

        limits = httpx.Limits(max_connections=args.concurrency, max_keepalive_connections=args.concurrency)
        async with httpx.AsyncClient(base_url=stack.proxy_url, limits=limits, timeout=30) as http:

            async def login(i: int) -> None:
                secret, pubkey = users[i]
                started = await http.post("/api/v1/client-mfa/start", json={"location_id": location.id, "pubkey": pubkey, "method": 0})
                finished = await http.post(
                    "/api/v1/client-mfa/finish", json={"token": started.json()["token"], "code": pyotp.TOTP(secret).now()}
                )
                if finished.status_code != 200:
                    raise RuntimeError(f"login {i} failed: {finished.status_code} {finished.text}")

            async def health(_i: int) -> None:
                assert (await http.get("/api/v1/health")).status_code == 200

            bus = await Bus.connect(nats.url, "bench", wait_s=5)

            async def hello(_i: int) -> None:
                await bus.call(subjects.RPC_CORE_HELLO, rpc.CoreHello(), rpc.CoreHelloResult, timeout=10)

            await run_concurrently(200, args.concurrency, health)  # warm-up
            await run_concurrently(200, args.concurrency, hello)
            floor_http = summary("http no-op (GET /api/v1/health)", args.floor, *await run_concurrently(args.floor, args.concurrency, health))
            floor_nats = summary("nats request/reply no-op (core hello)", args.floor, *await run_concurrently(args.floor, args.concurrency, hello))
            print(f"{args.users} logins...", file=sys.stderr)
            logins = summary("complete TOTP login (start + finish)", args.users, *await run_concurrently(args.users, args.concurrency, login))
            await bus.close()
        return {
            "database": "postgresql" if args.postgres else "sqlite",
            "concurrency": args.concurrency,
            "results": [logins, floor_http, floor_nats],
            "login_vs_http_noop": logins["per_second"] / floor_http["per_second"],
            "login_vs_nats_noop": logins["per_second"] / floor_nats["per_second"],
        }
    finally:
        await stack.stop()
        nats.stop()
        if cluster:
            cluster.stop()
        shutil.rmtree(work, ignore_errors=True)


def cli() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--users", type=int, default=400, help="logins to run (one per user)")
    parser.add_argument("--floor", type=int, default=3000, help="no-op requests for each floor")
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--postgres", action="store_true", help="core on a throwaway PostgreSQL instead of SQLite")
    run_benchmark(parser, main, show)


def show(report: dict) -> None:
    print(f"database {report['database']}, concurrency {report['concurrency']}")
    for r in report["results"]:
        print(f"  {r['name']:<42} {r['per_second']:8.1f}/s   p50 {r['p50_ms']:6.1f} ms   p99 {r['p99_ms']:6.1f} ms")
    print(f"  a login costs {1 / report['login_vs_http_noop']:.1f} HTTP no-ops, {1 / report['login_vs_nats_noop']:.1f} NATS no-ops")


if __name__ == "__main__":
    cli()
