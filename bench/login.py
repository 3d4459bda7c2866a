"""Complete TOTP logins per second through the proxy's HTTP API, against the bare floor
measured in the same run with the same generator: an HTTP no-op (GET /api/v1/health on the
same proxy) and a NATS request/reply no-op (the core's hello RPC). Then logins arriving at
half the peak rate, for the latency of `finish` when the system is not saturated.

    .venv/bin/python -m bench.login [--users 400] [--concurrency 16] [--postgres]

Each TOTP time step is accepted once per user, so every login is a different user; the
users are created before the clock starts. The generator is a bare HTTP/1.1 keep-alive
client on asyncio streams (one connection per worker), far cheaper per request than the
services it drives; its own CPU use is reported for every phase.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import resource
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import pyotp

from bench.common import nats_server, run_benchmark
from events import subjects
from events.bus import Bus
from schemas import rpc
from tests.support.postgres import PostgresCluster
from tests.support.stack import Stack


class HttpConnection:
    """One keep-alive HTTP/1.1 connection: a request, then its answer (Content-Length)."""

    def __init__(self, url: str) -> None:
        host_port = url.split("://", 1)[1].rstrip("/")
        self.host, port = host_port.rsplit(":", 1)
        self.port = int(port)
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def request(self, method: str, path: str, body: object | None = None) -> tuple[int, bytes]:
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        assert self.reader is not None
        payload = json.dumps(body).encode() if body is not None else b""
        head = f"{method} {path} HTTP/1.1\r\nhost: {self.host}\r\ncontent-length: {len(payload)}\r\n"
        if body is not None:
            head += "content-type: application/json\r\n"
        self.writer.write(head.encode() + b"\r\n" + payload)
        answer = await self.reader.readuntil(b"\r\n\r\n")
        status = int(answer[9:12])
        length = 0
        for line in answer.split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value)
        return status, await self.reader.readexactly(length)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


async def run_concurrently(count: int, concurrency: int, job, url: str | None = None) -> tuple[float, list[float], float]:  # type: ignore[no-untyped-def]
    """Runs job(i, connection) for i < count with `concurrency` workers, each with an HTTP
    connection of its own to `url`; (elapsed seconds, latencies, client CPU share)."""
    queue: asyncio.Queue[int] = asyncio.Queue()
    for i in range(count):
        queue.put_nowait(i)
    latencies: list[float] = []

    async def worker() -> None:
        connection = HttpConnection(url) if url else None
        try:
            while True:
                try:
                    i = queue.get_nowait()
                except asyncio.QueueEmpty:
                    return
                began = time.perf_counter()
                await job(i, connection)
                latencies.append(time.perf_counter() - began)
        finally:
            if connection is not None:
                connection.close()

    began, cpu = time.perf_counter(), cpu_seconds()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    elapsed = time.perf_counter() - began
    return elapsed, latencies, (cpu_seconds() - cpu) / elapsed


async def run_paced(count: int, rate: float, job, url: str) -> tuple[float, list[float], float]:  # type: ignore[no-untyped-def]
    """Starts job(i, connection) at `rate` per second whatever the answers take (open
    loop), on a pool of connections that grows as needed."""
    idle: list[HttpConnection] = []
    latencies: list[float] = []

    async def one(i: int) -> None:
        connection = idle.pop() if idle else HttpConnection(url)
        began = time.perf_counter()
        await job(i, connection)
        latencies.append(time.perf_counter() - began)
        idle.append(connection)

    began, cpu = time.perf_counter(), cpu_seconds()
    tasks = []
    for i in range(count):
        delay = began + i / rate - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(one(i)))
    await asyncio.gather(*tasks)
    elapsed = time.perf_counter() - began
    for connection in idle:
        connection.close()
    return elapsed, latencies, (cpu_seconds() - cpu) / elapsed


def summary(name: str, count: int, elapsed: float, latencies: list[float], client_cpu: float) -> dict:
    ordered = sorted(latencies)
    return {
        "name": name,
        "operations": count,
        "per_second": count / elapsed,
        "p50_ms": statistics.median(ordered) * 1000,
        "p99_ms": ordered[max(0, int(len(ordered) * 0.99) - 1)] * 1000,
        "client_cpu": client_cpu,
    }


async def main(args: argparse.Namespace) -> dict:
    with nats_server() as nats:
        return await run(args, nats.url)


async def run(args: argparse.Namespace, nats_url: str) -> dict:
    work = Path(tempfile.mkdtemp(prefix="wgmfa-bench-"))
    cluster = None
    database_url = None
    if args.postgres:
        cluster = PostgresCluster(work / "pg")
        cluster.start()
        database_url = cluster.create_database("bench")
    settings = {"rate_limit_per_s": "0", "log_level": "WARNING"}
    if database_url is None:
        # one core owns the file: statements inline; several share it: each waits for its lock
        settings["sqlite_inline"] = "false" if args.core_processes > 1 or args.sqlite_thread else "true"
    stack = Stack(nats_url, work, database_url=database_url, **settings)
    try:
        await stack.start()
        for _ in range(args.core_processes - 1):  # more cores in the RPC queue group
            await stack.extra_core()
        location = (await stack.add_location("bench", network="10.64.0.0/16")).location
        paced_users = args.users // 2
        total = args.users + paced_users
        print(f"creating {total} users with TOTP and a device...", file=sys.stderr)
        users: list[tuple[str, str]] = [("", "")] * total

        async def create(i: int, _connection: object) -> None:
            secret = await stack.add_user_with_totp(f"u{i}")
            _, device = await stack.add_device(f"u{i}", "laptop", "bench")
            users[i] = (secret, device.pubkey)

        await run_concurrently(total, args.concurrency, create)
        finishes: list[float] = []

        async def login(i: int, http: HttpConnection) -> None:
            secret, pubkey = users[i]
            status, body = await http.request(
                "POST", "/api/v1/client-mfa/start", {"location_id": location.id, "pubkey": pubkey, "method": 0}
            )
            if status != 200:
                raise RuntimeError(f"login {i} failed to start: {status} {body!r}")
            began = time.perf_counter()
            status, body = await http.request(
                "POST", "/api/v1/client-mfa/finish", {"token": json.loads(body)["token"], "code": pyotp.TOTP(secret).now()}
            )
            finishes.append(time.perf_counter() - began)
            if status != 200:
                raise RuntimeError(f"login {i} failed: {status} {body!r}")

        async def health(_i: int, http: HttpConnection) -> None:
            status, _ = await http.request("GET", "/api/v1/health")
            assert status == 200

        bus = await Bus.connect(nats_url, "bench", wait_s=5)

        async def hello(_i: int, _connection: object) -> None:
            await bus.call(subjects.RPC_CORE_HELLO, rpc.CoreHello(), rpc.CoreHelloResult, timeout=10)

        url = stack.proxy_url
        await run_concurrently(min(200, args.floor), args.concurrency, health, url)  # warm-up
        await run_concurrently(min(200, args.floor), args.concurrency, hello)
        floor_http = summary("http no-op (GET /api/v1/health)", args.floor, *await run_concurrently(args.floor, args.concurrency, health, url))
        floor_nats = summary("nats request/reply no-op (core hello)", args.floor, *await run_concurrently(args.floor, args.concurrency, hello))
        print(f"{args.users} logins...", file=sys.stderr)
        logins = summary(
            "complete TOTP login (start + finish)", args.users, *await run_concurrently(args.users, args.concurrency, login, url)
        )
        half_rate = logins["per_second"] / 2
        finishes.clear()
        elapsed, _, paced_cpu = await run_paced(
            paced_users, half_rate, lambda i, http: login(args.users + i, http), url
        )
        paced = summary(f"finish, logins arriving at {half_rate:.0f}/s", paced_users, elapsed, finishes, paced_cpu)
        await bus.close()
        return {
            "database": "postgresql" if args.postgres else "sqlite",
            "concurrency": args.concurrency,
            "core_processes": args.core_processes,
            "results": [logins, floor_http, floor_nats, paced],
            "login_vs_http_noop": logins["per_second"] / floor_http["per_second"],
            "login_vs_nats_noop": logins["per_second"] / floor_nats["per_second"],
        }
    finally:
        await stack.stop()
        if cluster:
            cluster.stop()
        shutil.rmtree(work, ignore_errors=True)


def cli() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--users", type=int, default=400, help="logins to run (one per user)")
    parser.add_argument("--floor", type=int, default=3000, help="no-op requests for each floor")
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--postgres", action="store_true", help="core on a throwaway PostgreSQL instead of SQLite")
    parser.add_argument("--core-processes", type=int, default=1, help="core processes sharing the RPCs")
    parser.add_argument("--sqlite-thread", action="store_true", help="SQLite statements on aiosqlite's thread (WGMFA_SQLITE_INLINE=false)")
    run_benchmark(parser, main, show)


def show(report: dict) -> None:
    print(f"database {report['database']}, concurrency {report['concurrency']}, core processes {report['core_processes']}")
    for r in report["results"]:
        print(
            f"  {r['name']:<42} {r['per_second']:8.1f}/s   p50 {r['p50_ms']:6.1f} ms   p99 {r['p99_ms']:6.1f} ms"
            f"   client CPU {r['client_cpu'] * 100:3.0f}%"
        )
    print(f"  a login costs {1 / report['login_vs_http_noop']:.1f} HTTP no-ops, {1 / report['login_vs_nats_noop']:.1f} NATS no-ops")


if __name__ == "__main__":
    cli()
