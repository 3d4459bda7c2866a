"""The bare cost of an RPC endpoint on the bus: a no-op request/reply answered by the
FastStream endpoint every core handler uses (events.bus.RpcRouter: typed request, reply
envelope, outcome middleware, `RPC_CONCURRENCY` plain subscribers of the queue group) and
by one FastStream subscriber with `max_workers` (the concurrent subscriber, which the
endpoint avoids for its cost), against the same no-op answered by a raw nats-py
subscription that decodes and encodes the same models by hand, in the same run.

Each server runs in a process of its own; the load comes from several client processes
(raw nats-py requests) whose CPU time is reported, so that the generator is not what is
measured. The two servers are measured alternately, `--rounds` times each.

    .venv/bin/python -m bench.rpc [--requests 20000] [--concurrency 64] [--clients 2] [--rounds 3]
"""
from __future__ import annotations

import argparse
import asyncio
import os
import resource
import statistics
import subprocess
import sys
import time

import nats

from bench.common import nats_server, run_benchmark
from events.bus import RPC_CONCURRENCY
from schemas.rpc import CoreHello, CoreHelloResult, RpcReply

SUBJECT = "bench.rpc.noop"
REPLY = CoreHelloResult(rpc_public_key="k" * 44, version="bench", instance_id="bench")


async def serve_raw(url: str) -> None:
    nc = await nats.connect(url)

    async def on_message(msg) -> None:  # type: ignore[no-untyped-def]
        CoreHello.model_validate_json(msg.data)
        await msg.respond(RpcReply(ok=True, result=REPLY.model_dump(mode="json")).model_dump_json().encode())

    await nc.subscribe(SUBJECT, queue="core", cb=on_message)
    await nc.flush()
    print("ready", flush=True)
    await asyncio.Event().wait()


async def serve_faststream(url: str, kind: str) -> None:
    from events.bus import Bus, payload_decoder

    bus = await Bus.connect(url, "bench", wait_s=5)

    async def hello(request: CoreHello) -> CoreHelloResult:
        return REPLY

    router = bus.rpc_router()
    if kind == "faststream":
        router.endpoint(SUBJECT, hello)  # as the core serves its client-facing subjects
    else:  # one subscriber with FastStream's own concurrency
        router.subscriber(SUBJECT, queue="core", max_workers=RPC_CONCURRENCY)(hello, decoder=payload_decoder(hello))
    await bus.serve(router)
    print("ready", flush=True)
    await asyncio.Event().wait()


async def load(url: str, requests: int, concurrency: int) -> None:
    nc = await nats.connect(url)
    body = b"{}"
    remaining = requests

    async def worker() -> None:
        nonlocal remaining
        while remaining > 0:
            remaining -= 1
            reply = await nc.request(SUBJECT, body, timeout=10)
            if not reply.data.startswith(b'{"ok":true'):
                raise RuntimeError(f"unexpected reply: {reply.data[:200]!r}")

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    await nc.close()
    usage = resource.getrusage(resource.RUSAGE_SELF)
    print(f"{usage.ru_utime + usage.ru_stime}", flush=True)


def _spawn(*args: str) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "bench.rpc", *args], stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})


def measure(url: str, kind: str, args: argparse.Namespace) -> dict:
    server = _spawn("--serve", kind, url)
    try:
        assert server.stdout is not None and server.stdout.readline().strip() == "ready"
        per_client = args.requests // args.clients
        began = time.perf_counter()
        clients = [_spawn("--load", url, str(per_client), str(args.concurrency)) for _ in range(args.clients)]
        cpu = [float(c.communicate()[0].strip().splitlines()[-1]) for c in clients]
        elapsed = time.perf_counter() - began
        if any(c.returncode for c in clients):
            raise RuntimeError("a load generator failed")
        return {"per_second": per_client * args.clients / elapsed, "client_cpu_s": sum(cpu), "elapsed_s": elapsed}
    finally:
        server.kill()
        server.wait()


async def main(args: argparse.Namespace) -> dict:
    with nats_server() as server:
        rounds: dict[str, list[dict]] = {"raw": [], "faststream": [], "faststream-max-workers": []}
        for _ in range(args.rounds):
            for kind in rounds:  # alternately, so that drift on the machine hits both
                rounds[kind].append(await asyncio.to_thread(measure, server.url, kind, args))
    raw = statistics.median(r["per_second"] for r in rounds["raw"])
    fast = statistics.median(r["per_second"] for r in rounds["faststream"])
    workers = statistics.median(r["per_second"] for r in rounds["faststream-max-workers"])
    return {
        "requests": args.requests, "concurrency": args.concurrency, "clients": args.clients, "rounds": rounds,
        "raw_per_second": raw, "faststream_per_second": fast, "faststream_vs_raw": fast / raw,
        "faststream_max_workers_per_second": workers, "faststream_max_workers_vs_raw": workers / raw,
    }


def show(report: dict) -> None:
    print(f"no-op RPC, {report['requests']} requests from {report['clients']} client processes at concurrency "
          f"{report['concurrency']} each (median of {len(report['rounds']['raw'])} alternating rounds)")
    for kind, runs in report["rounds"].items():
        rate = statistics.median(r["per_second"] for r in runs)
        cpu = statistics.median(r["client_cpu_s"] / r["elapsed_s"] for r in runs)
        print(f"  {kind:>14}: {rate:8.0f} replies/s  (load generators' CPU {cpu:.2f} cores)")
    print(f"  the core's FastStream endpoint ({RPC_CONCURRENCY} subscribers) answers at {report['faststream_vs_raw']:.2f}x "
          f"the raw nats-py handler's rate (cost per call {1 / report['faststream_vs_raw']:.2f}x); "
          f"one subscriber with max_workers={RPC_CONCURRENCY} at {report['faststream_max_workers_vs_raw']:.2f}x")


def cli() -> None:
    if len(sys.argv) > 2 and sys.argv[1] == "--serve":
        kind = sys.argv[2]
        asyncio.run(serve_raw(sys.argv[3]) if kind == "raw" else serve_faststream(sys.argv[3], kind))
        return
    if len(sys.argv) > 2 and sys.argv[1] == "--load":
        asyncio.run(load(sys.argv[2], int(sys.argv[3]), int(sys.argv[4])))
        return
    parser = argparse.ArgumentParser(prog="python -m bench.rpc", description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=20000)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--clients", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    run_benchmark(parser, main, show)


if __name__ == "__main__":
    cli()
