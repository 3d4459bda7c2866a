"""The core's peer-state publish (events.peer_log.PeerLog.publish_peer_state), which
publishes over the last state it knows of a subject without reading the subject first,
against the read-then-publish it replaced (read the subject's last message, then publish
expecting its sequence), in the same run, alternately.

Each round publishes, one at a time, an authorization and then a revoke for each of
`--devices` devices: the first on a subject never written, the second over the first (as
a login, then the reaper's revoke, which the core's consumer delivers). Reported: this
process's CPU per state (the core's side of a publish), nats-server's CPU per state, and
the publish latency. nats-server syncs every JetStream write to disk, as deployed.

    .venv/bin/python -m bench.peer_log [--devices 1000] [--rounds 3]
"""
from __future__ import annotations

import argparse
import statistics
import time

from bench.common import nats_server, percentiles, process_cpu_seconds, run_benchmark
from events import subjects
from events.bus import Bus
from events.peer_log import PeerLog
from schemas.common import RevokeReason, utcnow
from schemas.events import PeerAuthorized, PeerRevoked
from schemas.signing import PeerSigner

SIGNER = PeerSigner(b"b" * 32)


def states(location: int, devices: int) -> list[PeerAuthorized | PeerRevoked]:
    out: list[PeerAuthorized | PeerRevoked] = []
    for device in range(1, devices + 1):
        out.append(SIGNER.sign(PeerAuthorized(location_id=location, device_id=device, generation=1, pubkey=f"k{device}",
                                              allowed_ips=[], keepalive_s=25, authorized_at=utcnow())))
        out.append(PeerRevoked(location_id=location, device_id=device, generation=1, pubkey=f"k{device}",
                               reason=RevokeReason.IDLE))
    return out


async def read_then_publish(bus: Bus, log: PeerLog, state: PeerAuthorized | PeerRevoked) -> None:
    last = await log.last_peer_state(state.location_id, state.device_id)
    await bus.publish(subjects.peer(state.location_id, state.device_id), state,
                      expected_last_subject_seq=last.sequence if last else 0)


async def measure(bus: Bus, server_pid: int, kind: str, location: int, devices: int) -> dict:
    log = PeerLog(bus, signing_key=SIGNER.public_key)
    todo = states(location, devices)
    latencies = []
    cpu0, server0, began = time.process_time(), process_cpu_seconds(server_pid), time.perf_counter()
    for state in todo:
        start = time.perf_counter()
        if kind == "remembered":
            assert await log.publish_peer_state(state)
            # the revoke that follows is the reaper's in a deployment: the core's consumer
            # delivers it with its sequence; here the publisher's own ack stands for that
        else:
            await read_then_publish(bus, log, state)
        latencies.append(time.perf_counter() - start)
    elapsed = time.perf_counter() - began
    return {
        "states": len(todo), "per_second": len(todo) / elapsed,
        "cpu_us_per_state": (time.process_time() - cpu0) / len(todo) * 1e6,
        "server_cpu_us_per_state": (process_cpu_seconds(server_pid) - server0) / len(todo) * 1e6,
        **percentiles(latencies),
    }


async def main(args: argparse.Namespace) -> dict:
    rounds: dict[str, list[dict]] = {"read then publish": [], "remembered": []}
    with nats_server() as server:
        assert server.process is not None
        bus = await Bus.connect(server.url, "bench", wait_s=10)
        try:
            await bus.ensure_streams()
            location = 0
            for _ in range(args.rounds):
                for kind in rounds:  # alternately, so that drift on the machine hits both
                    location += 1
                    rounds[kind].append(await measure(bus, server.process.pid, kind, location, args.devices))
        finally:
            await bus.close()

    def median(kind: str, key: str) -> float:
        return statistics.median(r[key] for r in rounds[kind])

    return {
        "devices": args.devices, "rounds": rounds,
        "cpu_ratio": median("remembered", "cpu_us_per_state") / median("read then publish", "cpu_us_per_state"),
        "server_cpu_ratio": (median("remembered", "server_cpu_us_per_state")
                             / max(median("read then publish", "server_cpu_us_per_state"), 1e-9)),
        "p50_ratio": median("remembered", "p50_ms") / median("read then publish", "p50_ms"),
    }


def show(report: dict) -> None:
    print(f"peer states published one at a time, {report['devices']} devices x 2 states, "
          f"median of {len(report['rounds']['remembered'])} alternating rounds")
    for kind, runs in report["rounds"].items():
        print(f"  {kind:>17}: {statistics.median(r['per_second'] for r in runs):7.0f}/s, "
              f"CPU {statistics.median(r['cpu_us_per_state'] for r in runs):5.0f} µs here and "
              f"{statistics.median(r['server_cpu_us_per_state'] for r in runs):4.0f} µs in nats-server per state, "
              f"p50 {statistics.median(r['p50_ms'] for r in runs):.2f} ms, "
              f"p99 {statistics.median(r['p99_ms'] for r in runs):.2f} ms")
    print(f"  remembered / read then publish: CPU {report['cpu_ratio']:.2f}, nats-server CPU "
          f"{report['server_cpu_ratio']:.2f}, p50 latency {report['p50_ratio']:.2f}")


def cli() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--devices", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=3)
    run_benchmark(parser, main, show)


if __name__ == "__main__":
    cli()
