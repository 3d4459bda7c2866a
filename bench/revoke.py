"""Revoke latency: from the reaper's sweep deciding to revoke to the peer being gone from
the gateway's interface, against the same run's baseline: the bare JetStream hop (publish
to the peer stream, a durable consumer receives it) for the same number of messages.
As root the gateway drives a real wireguard-go in a network namespace; otherwise the
in-memory fake.

    .venv/bin/python -m bench.revoke [--peers 200]
"""
from __future__ import annotations

import argparse
import asyncio
import os
import time
from datetime import timedelta

from bench.common import nats_server, percentiles, run_benchmark, wireguard_place
from events import streams, subjects
from events.bus import Bus
from runtime.testing import FakeClock
from schemas.sealing import generate_keypair, generate_psk, seal
from schemas.signing import PeerSigner
from gateway_worker.app import Gateway
from wireguard.testing import FakeBackend
from wireguard.userspace import UserspaceBackend
from gateway_worker.settings import GatewaySettings
from reaper_worker.app import Reaper, ReaperSettings
from schemas.common import RevokeReason, utcnow
from schemas.events import PeerAuthorized, PeerRevoked, PeerState
from schemas.rpc import GatewayCredentials

THRESHOLD = 300


async def main(args: argparse.Namespace) -> dict:
    with wireguard_place(args.backend) as (backend_kind, netns), nats_server() as server:
        return {"backend": backend_kind, **await measure(server.url, args.peers, backend_kind, netns)}


async def measure(url: str, peers: int, backend_kind: str, netns: str | None) -> dict:
    bus = await Bus.connect(url, "bench", wait_s=5)
    await bus.ensure_streams()

    # baseline: the bare hop through the peer stream to a durable consumer
    received: dict[int, float] = {}
    sent: dict[int, float] = {}

    async def note(state: PeerState) -> None:
        received[state.device_id] = time.perf_counter()

    baseline_consumer = bus.stream_router()
    baseline_consumer.consumer(note, stream=streams.PEERS.name, durable="bench-baseline",
                               filter_subject=subjects.peers_of_location(999))
    await bus.serve(baseline_consumer)
    await asyncio.sleep(0.5)
    for device in range(peers):
        sent[device] = time.perf_counter()
        await bus.publish(subjects.peer(999, device), PeerRevoked(location_id=999, device_id=device, generation=1,
                                                                  pubkey=generate_keypair()[1], reason=RevokeReason.IDLE))
    while len(received) < peers:
        await asyncio.sleep(0.01)
    baseline = [received[d] - sent[d] for d in range(peers)]

    # the real path: reaper sweep -> peer.revoked -> gateway -> interface
    sealing_private, sealing_public = generate_keypair()
    signer = PeerSigner(b"r" * 32)  # plays the core's key
    credentials = GatewayCredentials(location_id=1, location_name="bench", private_key=generate_keypair()[0],
                                     sealing_private_key=sealing_private, listen_port=41001, address="10.201.0.1/16",
                                     network="10.201.0.0/16", mfa_required=True, core_signing_key=signer.public_key)
    backend = UserspaceBackend() if backend_kind == "userspace" else FakeBackend()
    settings = GatewaySettings(nats_url=url, gateway_id="bench", stats_interval=3600,
                               netns=netns, interface=f"wgr{os.getpid() % 10000}")
    gateway = Gateway(settings, credentials, backend, bus=bus)
    removed: dict[str, float] = {}
    original_remove = backend.remove_peer

    async def timed_remove(public_key: str) -> None:
        await original_remove(public_key)
        removed[public_key] = time.perf_counter()

    backend.remove_peer = timed_remove  # type: ignore[method-assign]
    await gateway.start()
    keys = [generate_keypair()[1] for _ in range(peers)]
    for device, key in enumerate(keys):
        await bus.publish(subjects.peer(1, device), signer.sign(PeerAuthorized(
            location_id=1, device_id=device, generation=1, session_id=device, pubkey=key,
            allowed_ips=[f"10.201.{device // 250}.{device % 250 + 2}/32"], keepalive_s=25,
            psk_sealed=seal(sealing_public, generate_psk()), authorized_at=utcnow(),
            expires_at=utcnow() + timedelta(hours=12), threshold_s=THRESHOLD)))
    while len((await backend.status()).peers) < peers:
        await asyncio.sleep(0.05)
    clock = FakeClock()
    reaper = Reaper(ReaperSettings(nats_url=url, sweep_interval_s=3600), clock=clock, bus=bus)
    await reaper.start()
    while len(reaper.liveness.authorizations) < peers:
        await asyncio.sleep(0.05)
    clock.advance(THRESHOLD + 1)
    decided = time.perf_counter()
    sweep_task = asyncio.create_task(reaper.sweep())
    while len(removed) < peers:
        await asyncio.sleep(0.005)
    await sweep_task
    latencies = [removed[key] - decided for key in keys]
    await reaper.stop()
    await gateway.stop()
    await backend.remove_interface()
    await bus.close()
    end_to_end = percentiles(latencies)
    hop = percentiles(baseline)
    return {
        "peers": peers,
        "sweep_to_removed": end_to_end,
        "bare_jetstream_hop": hop,
        "all_removed_after_s": max(latencies),
        "p50_vs_bare_hop": end_to_end["p50_ms"] / hop["p50_ms"],
    }


def cli() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--peers", type=int, default=200, help="peers revoked by one sweep")
    parser.add_argument("--backend", choices=["userspace", "fake"])
    run_benchmark(parser, main, show)


def show(report: dict) -> None:
    e2e, hop = report["sweep_to_removed"], report["bare_jetstream_hop"]
    print(f"backend {report['backend']}, {report['peers']} peers revoked by one sweep")
    print(f"  sweep decision -> peer removed   p50 {e2e['p50_ms']:7.1f} ms  p99 {e2e['p99_ms']:7.1f} ms  max {e2e['max_ms']:7.1f} ms")
    print(f"  bare JetStream hop (baseline)    p50 {hop['p50_ms']:7.1f} ms  p99 {hop['p99_ms']:7.1f} ms  max {hop['max_ms']:7.1f} ms")
    print(f"  p50 is {report['p50_vs_bare_hop']:.1f}x the bare hop (the gateway applies the revokes one after another)")


if __name__ == "__main__":
    cli()
