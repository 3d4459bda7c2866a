"""Complete TOTP logins per second through the proxy's HTTP API, against the bare floor
measured in the same run with the same generator: an HTTP no-op (GET /api/v1/health on the
same proxy) and a NATS request/reply no-op (the core's hello RPC). Then logins arriving at
half the peak rate, for the latency of `finish` when the system is not saturated.

    .venv/bin/python -m bench.login [--users 400] [--wrk-users 6000] [--concurrency 16] [--postgres]

Each TOTP time step is accepted once per user, so every login is a different user; the
users are created before the clock starts. Two generators, each with its own CPU use
reported for every phase: wrk (compiled, Debian's package; bench/login.lua drives start
and finish, one connection per thread, with codes computed here just before it starts),
which measures the peak and the HTTP no-op floor; and a bare HTTP/1.1 keep-alive client on
asyncio streams, for the same figures in Python, the NATS request/reply no-op (wrk speaks
no NATS) and `finish` latency at half the peak rate (open loop). The core's and the
proxy's CPU per operation are read from /proc for every phase.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import pyotp

from bench.common import nats_server, process_cpu_seconds, proc_stat, run_benchmark
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


def cpu_seconds(who: int = resource.RUSAGE_SELF) -> float:
    usage = resource.getrusage(who)
    return usage.ru_utime + usage.ru_stime


def tree_cpu_seconds(pid: int) -> float:
    """CPU time a process and its children have used so far: the children alive now, and
    those that ended (counted into the parent's when it waited for them). PostgreSQL's
    postmaster and its backends."""
    fields = proc_stat(pid)
    ticks = sum(int(v) for v in fields[11:15])  # utime, stime, cutime, cstime
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            child = proc_stat(entry.name)
        except OSError:  # gone meanwhile
            continue
        if int(child[1]) == pid:
            ticks += sum(int(v) for v in child[11:15])
    return ticks / os.sysconf("SC_CLK_TCK")


def machine_cpu_seconds() -> tuple[float, float]:
    """(busy, total) CPU seconds of the whole machine so far, every core summed."""
    ticks = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = ticks[3] + ticks[4]  # idle + iowait
    return (sum(ticks) - idle) / os.sysconf("SC_CLK_TCK"), sum(ticks) / os.sysconf("SC_CLK_TCK")


class ServerCpu:
    """The CPU the services use during a phase, per operation, and how busy the whole
    machine was (other work included: on a shared machine the figures are a floor)."""

    def __init__(self, pids: dict[str, int], trees: dict[str, int] | None = None) -> None:
        self.pids = pids
        self.trees = trees or {}  # measured with their children (PostgreSQL's backends)
        self.began: dict[str, float] = {}
        self.machine = (0.0, 0.0)

    def _used(self) -> dict[str, float]:
        return {name: process_cpu_seconds(pid) for name, pid in self.pids.items()} | {
            name: tree_cpu_seconds(pid) for name, pid in self.trees.items()
        }

    def start(self) -> None:
        self.began = self._used()
        self.machine = machine_cpu_seconds()

    def per_operation_ms(self, operations: int) -> dict[str, float]:
        busy, total = machine_cpu_seconds()
        report = {
            f"{name}_cpu_ms_per_op": (used - self.began[name]) * 1000 / max(operations, 1)
            for name, used in self._used().items()
        }
        report["machine_busy"] = (busy - self.machine[0]) / max(total - self.machine[1], 1e-9)
        return report


WRK_SCRIPT = Path(__file__).with_name("login.lua")
TOTP_STEP_S = 30


async def run_wrk(url: str, connections: int, duration_s: float, script_args: list[str] | None = None) -> tuple[dict, float]:
    """wrk against `url` (with bench/login.lua when given its arguments): (its report, its
    own CPU share of one core)."""
    command = ["wrk", "-t", str(connections), "-c", str(connections), "-d", f"{duration_s:g}s", "--timeout", "10s", "--latency"]
    if script_args is not None:
        command += ["-s", str(WRK_SCRIPT), url, "--", *script_args]
    else:
        command.append(url)
    before = cpu_seconds(resource.RUSAGE_CHILDREN)
    began = time.perf_counter()
    process = await asyncio.create_subprocess_exec(*command, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await process.communicate()
    elapsed = time.perf_counter() - began
    client_cpu = (cpu_seconds(resource.RUSAGE_CHILDREN) - before) / elapsed
    text = out.decode()
    if process.returncode != 0:
        raise RuntimeError(f"wrk failed ({process.returncode}): {text}{err.decode()}")
    for line in text.splitlines():
        if line.startswith("WRK_RESULT "):
            return json.loads(line.split(" ", 1)[1]), client_cpu
    report: dict = {}
    for line in text.splitlines():
        words = line.split()
        if line.startswith("Requests/sec:"):
            report["per_second"] = float(words[1])
        elif len(words) == 2 and words[0] in ("50%", "99%"):
            report[f"p{words[0][:-1]}_ms"] = wrk_ms(words[1])
        elif "requests in" in line:
            report["requests"] = int(words[0])
        elif line.strip().startswith("Non-2xx") or line.strip().startswith("Socket errors"):
            raise RuntimeError(f"wrk saw errors: {text}")
    return report, client_cpu


def wrk_ms(value: str) -> float:
    for unit, factor in (("us", 0.001), ("ms", 1.0), ("s", 1000.0), ("m", 60000.0)):
        if value.endswith(unit):
            return float(value[: -len(unit)]) * factor
    raise ValueError(f"wrk latency {value!r}")


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
    if args.wrk_seconds > 25:
        raise SystemExit("--wrk-seconds is at most 25: every code is computed before wrk starts")
    with nats_server() as nats:
        assert nats.process is not None
        return await run(args, nats.url, nats.process.pid)


async def run(args: argparse.Namespace, nats_url: str, nats_pid: int | None = None) -> dict:
    work = Path(tempfile.mkdtemp(prefix="wgmfa-bench-"))
    cluster = None
    database_url = None
    if args.postgres:
        cluster = PostgresCluster(work / "pg", durable=True)
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
        wrk_count = args.wrk_users if args.generator == "wrk" else 0
        total = args.users + paced_users + wrk_count
        print(f"creating {total} users with TOTP and a device...", file=sys.stderr)
        users: list[tuple[str, str]] = [("", "")] * total

        async def create(i: int, _connection: object) -> None:
            secret = await stack.add_user_with_totp(f"u{i}")
            _, device = await stack.add_device(f"u{i}", "laptop", "bench")
            users[i] = (secret, device.pubkey)

        await run_concurrently(total, args.concurrency, create)
        wrk_users = users[args.users + paced_users:]
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
        assert stack.core.process is not None and stack.proxy.process is not None
        pids = {"core": stack.core.process.pid, "proxy": stack.proxy.process.pid}
        if nats_pid is not None:
            pids["nats"] = nats_pid
        servers = ServerCpu(pids, {"postgres": cluster.postmaster_pid()} if cluster else None)

        async def measured(name: str, count: int, job, connection_url: str | None = None) -> dict:  # type: ignore[no-untyped-def]
            servers.start()
            result = summary(name, count, *await run_concurrently(count, args.concurrency, job, connection_url))
            return result | servers.per_operation_ms(count)

        await run_concurrently(min(200, args.floor), args.concurrency, health, url)  # warm-up
        await run_concurrently(min(200, args.floor), args.concurrency, hello)
        results = []
        wrk_login = wrk_floor = None
        if wrk_users:
            servers.start()
            floor, client_cpu = await run_wrk(f"{url}/api/v1/health", args.concurrency, args.wrk_floor_s)
            wrk_floor = {"name": "wrk: http no-op (GET /api/v1/health)", "operations": floor["requests"],
                         "per_second": floor["per_second"], "p50_ms": floor["p50_ms"], "p99_ms": floor["p99_ms"],
                         "client_cpu": client_cpu} | servers.per_operation_ms(floor["requests"])
            print(f"wrk: logins for up to {args.wrk_seconds:g} s...", file=sys.stderr)
            users_file = work / "wrk-users.txt"
            # each user's code of this time step, accepted for 30 to 60 s more (steps T, T-1)
            users_file.write_text("".join(f"{pubkey} {pyotp.TOTP(secret).now()}\n" for secret, pubkey in wrk_users))
            servers.start()
            done, client_cpu = await run_wrk(url, args.concurrency, args.wrk_seconds,
                                             [str(users_file), str(args.concurrency), str(location.id)])
            seconds = done["duration_us"] / 1e6
            wrk_login = {"name": "wrk: complete TOTP login (start + finish)", "operations": done["logins"],
                         "per_second": done["logins"] / seconds, "p50_ms": done["request_p50_us"] / 1000,
                         "p99_ms": done["request_p99_us"] / 1000, "client_cpu": client_cpu,
                         "failed": done["failed"], "threads_out_of_users": done["threads_exhausted"],
                         "latency_of": "each request (start or finish)"} | servers.per_operation_ms(done["logins"])
            if done["failed"]:
                raise RuntimeError(f"wrk: {done['failed']} logins failed")
            if done["threads_exhausted"]:
                # wrk divides by its whole -d: a thread that ran out of users stopped early,
                # so the rate is at most users / seconds, a floor rather than the system's
                wrk_login["name"] += " [a floor: threads ran out of users, raise --wrk-users]"
                print(f"wrk: {done['threads_exhausted']} threads ran out of users before {args.wrk_seconds:g} s; "
                      "the rate is a floor (raise --wrk-users)", file=sys.stderr)
            results += [wrk_login, wrk_floor]
        floor_http = await measured("http no-op (GET /api/v1/health)", args.floor, health, url)
        floor_nats = await measured("nats request/reply no-op (core hello)", args.floor, hello)
        print(f"{args.users} logins...", file=sys.stderr)
        logins = await measured("complete TOTP login (start + finish)", args.users, login, url)
        results = [logins, floor_http, floor_nats] + results
        peak = wrk_login["per_second"] if wrk_login else logins["per_second"]
        half_rate = peak / 2
        finishes.clear()
        servers.start()
        elapsed, _, paced_cpu = await run_paced(
            paced_users, half_rate, lambda i, http: login(args.users + i, http), url
        )
        paced = summary(f"finish, logins arriving at {half_rate:.0f}/s", paced_users, elapsed, finishes, paced_cpu)
        results.insert(3, paced | servers.per_operation_ms(paced_users))
        await bus.close()
        report = {
            "database": "postgresql" if args.postgres else "sqlite",
            "concurrency": args.concurrency,
            "core_processes": args.core_processes,
            # what a commit waits for: PostgreSQL's fsync of its WAL, as SQLite's and JetStream's writes wait for theirs
            "postgres_settings": {name: cluster.setting(name) for name in ("fsync", "synchronous_commit")} if cluster else None,
            "results": results,
            "login_vs_http_noop": logins["per_second"] / floor_http["per_second"],
            "login_vs_nats_noop": logins["per_second"] / floor_nats["per_second"],
        }
        if wrk_login and wrk_floor:
            report["wrk_login_vs_http_noop"] = wrk_login["per_second"] / wrk_floor["per_second"]
        return report
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
    parser.add_argument("--generator", choices=["wrk", "python"], default="wrk" if shutil.which("wrk") else "python",
                        help="the peak and HTTP floor with wrk (default when installed) as well as in Python")
    parser.add_argument("--wrk-users", type=int, default=6000,
                        help="users for wrk's logins (one login each: the rate can show at most users / --wrk-seconds)")
    parser.add_argument("--wrk-seconds", type=float, default=10, help="wrk's login phase (at most 25: codes are computed before)")
    parser.add_argument("--wrk-floor-s", type=float, default=5, help="wrk's HTTP no-op phase")
    run_benchmark(parser, main, show)


def show(report: dict) -> None:
    durability = report.get("postgres_settings")
    settings = f" ({', '.join(f'{k} {v}' for k, v in durability.items())})" if durability else ""
    print(f"database {report['database']}{settings}, concurrency {report['concurrency']}, core processes {report['core_processes']}")
    for r in report["results"]:
        print(
            f"  {r['name']:<46} {r['per_second']:8.1f}/s   p50 {r['p50_ms']:6.1f} ms   p99 {r['p99_ms']:6.1f} ms"
            f"   client CPU {r['client_cpu'] * 100:3.0f}%   CPU ms/op: core {r['core_cpu_ms_per_op']:5.2f},"
            f" proxy {r['proxy_cpu_ms_per_op']:5.2f}, nats {r.get('nats_cpu_ms_per_op', 0):5.2f}"
            + (f", postgres {r['postgres_cpu_ms_per_op']:5.2f}" if "postgres_cpu_ms_per_op" in r else "")
            + f"   machine busy {r['machine_busy'] * 100:3.0f}%"
        )
    print(f"  Python generator: a login costs {1 / report['login_vs_http_noop']:.1f} HTTP no-ops,"
          f" {1 / report['login_vs_nats_noop']:.1f} NATS no-ops")
    if "wrk_login_vs_http_noop" in report:
        print(f"  wrk: a login costs {1 / report['wrk_login_vs_http_noop']:.1f} HTTP no-ops")


if __name__ == "__main__":
    cli()
