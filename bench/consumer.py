"""A durable stream consumer's cost per message: the one every service uses
(events.bus.StreamRouter.consumer: the server pushes to the role's deliver group, each
process handles one message at a time) against the FastStream pull subscriber it replaced
(one fetch request per message, batch size 1), with the same middlewares and handler, in
the same run, alternately.

Two loads: messages one by one at `--rate` per second (a login's authorization reaching
the core's consumer), and a backlog of `--messages` published before the consumer starts
(a consumer catching up). Each consumer runs in a process of its own; reported are its
CPU per message and nats-server's, which syncs every JetStream write to disk, as deployed.

    .venv/bin/python -m bench.consumer [--messages 2000] [--rate 300] [--rounds 3]
"""
from __future__ import annotations

import argparse
import asyncio
import statistics
import subprocess
import sys
import time
import uuid

import nats

from bench.common import nats_server, process_cpu_seconds, run_benchmark
from schemas.events import MfaStarted

STREAM = "BENCH_CONSUMER"
SUBJECTS = "bench.consumer.>"
KINDS = ("pull, one fetch per message", "durable consumer")


async def consume(url: str, kind: str, count: int) -> None:
    """The consumer process: ready, then (on a line from the parent) consume `count` messages."""
    from faststream import AckPolicy
    from faststream.nats import AckPolicy as JsAckPolicy
    from faststream.nats import ConsumerConfig, JStream, PullSub

    from events.bus import Bus, payload_decoder

    bus = await Bus.connect(url, "bench", wait_s=5)
    handled = 0
    done = asyncio.Event()

    async def handle(event: MfaStarted) -> None:
        nonlocal handled
        handled += 1
        if handled >= count:
            done.set()

    router = bus.stream_router()
    durable = f"bench-{uuid.uuid4().hex[:8]}"
    if kind == KINDS[1]:
        router.consumer(handle, stream=STREAM, durable=durable, filter_subject=SUBJECTS)
    else:  # the consumer before: a pull subscriber fetching one message at a time
        router.subscriber(
            SUBJECTS, stream=JStream(STREAM, declare=False), durable=durable,
            pull_sub=PullSub(batch_size=1, timeout=1), inbox_prefix=f"{bus.inbox_prefix}.".encode(),
            config=ConsumerConfig(ack_policy=JsAckPolicy.EXPLICIT, max_deliver=10, ack_wait=30),
            ack_policy=AckPolicy.NACK_ON_ERROR,
        )(handle, decoder=payload_decoder(handle))
    print("ready", flush=True)
    await asyncio.to_thread(sys.stdin.readline)
    await bus.serve(router)
    await done.wait()
    print("done", flush=True)
    await bus.close()


def event(i: int) -> bytes:
    return MfaStarted(
        location_id=1, location_name="office", device_id=i, device_name="laptop", user_id=i, username=f"u{i}",
        login_id=uuid.uuid4(), method="totp", client_ip="192.0.2.1", expires_at="2030-01-01T00:00:00Z",
    ).model_dump_json().encode()


async def publish(js: object, count: int, rate: float | None) -> None:
    began = time.perf_counter()
    for i in range(count):
        if rate:
            delay = began + i / rate - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
        await js.publish(f"bench.consumer.{i % 100}", event(i))  # type: ignore[attr-defined]


async def measure(url: str, server_pid: int, kind: str, load: str, args: argparse.Namespace) -> dict:
    nc = await nats.connect(url)
    js = nc.jetstream()
    try:
        await js.delete_stream(STREAM)
    except nats.js.errors.NotFoundError:
        pass
    await js.add_stream(name=STREAM, subjects=[SUBJECTS])
    if load == "backlog":
        await publish(js, args.messages, None)
    consumer = subprocess.Popen([sys.executable, "-m", "bench.consumer", "--consume", url, kind, str(args.messages)],
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert consumer.stdin is not None and consumer.stdout is not None
        assert consumer.stdout.readline().strip() == "ready"
        cpu0, server0, began = process_cpu_seconds(consumer.pid), process_cpu_seconds(server_pid), time.perf_counter()
        consumer.stdin.write("go\n")
        consumer.stdin.flush()
        if load == "one by one":
            await publish(js, args.messages, args.rate)
        line = await asyncio.to_thread(consumer.stdout.readline)
        assert line.strip() == "done", line
        elapsed = time.perf_counter() - began
        return {
            "messages": args.messages, "per_second": args.messages / elapsed,
            "consumer_cpu_us": (process_cpu_seconds(consumer.pid) - cpu0) / args.messages * 1e6,
            "server_cpu_us": (process_cpu_seconds(server_pid) - server0) / args.messages * 1e6,
        }
    finally:
        consumer.kill()
        consumer.wait()
        await nc.close()


async def main(args: argparse.Namespace) -> dict:
    loads = ("one by one", "backlog")
    rounds: dict[str, dict[str, list[dict]]] = {load: {kind: [] for kind in KINDS} for load in loads}
    with nats_server() as server:
        assert server.process is not None
        for _ in range(args.rounds):
            for load in loads:
                for kind in KINDS:  # alternately, so that drift on the machine hits both
                    rounds[load][kind].append(await measure(server.url, server.process.pid, kind, load, args))

    def median(load: str, kind: str, key: str) -> float:
        return statistics.median(r[key] for r in rounds[load][kind])

    ratios = {
        load: {
            key: median(load, KINDS[1], key) / max(median(load, KINDS[0], key), 1e-9)
            for key in ("consumer_cpu_us", "server_cpu_us")
        }
        for load in loads
    }
    return {"messages": args.messages, "rate": args.rate, "rounds": rounds, "ratios": ratios}


def show(report: dict) -> None:
    runs_of_each = len(report["rounds"]["backlog"][KINDS[0]])
    print(f"{report['messages']} messages per run, median of {runs_of_each} alternating rounds")
    for load, kinds in report["rounds"].items():
        title = f"one by one at {report['rate']:g}/s" if load == "one by one" else "a backlog"
        print(f"  {title}:")
        for kind, runs in kinds.items():
            print(f"    {kind:>28}: CPU {statistics.median(r['consumer_cpu_us'] for r in runs):5.0f} µs in the consumer, "
                  f"{statistics.median(r['server_cpu_us'] for r in runs):4.0f} µs in nats-server per message, "
                  f"{statistics.median(r['per_second'] for r in runs):6.0f}/s")
        ratio = report["ratios"][load]
        print(f"    durable consumer / pull: consumer CPU {ratio['consumer_cpu_us']:.2f}, nats-server CPU {ratio['server_cpu_us']:.2f}")


def cli() -> None:
    if len(sys.argv) > 4 and sys.argv[1] == "--consume":
        asyncio.run(consume(sys.argv[2], sys.argv[3], int(sys.argv[4])))
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=2000)
    parser.add_argument("--rate", type=float, default=300)
    parser.add_argument("--rounds", type=int, default=3)
    run_benchmark(parser, main, show)


if __name__ == "__main__":
    cli()
