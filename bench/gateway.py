"""Gateway diff-resync time for 1 000 and 10 000 peers, against the same run's baselines:
reading the location's snapshot from the stream alone, and one full read of the
interface. As root the interface is a real wireguard-go in a network namespace;
otherwise the in-memory fake (say which in the report).

    .venv/bin/python -m bench.gateway [--sizes 1000 10000] [--backend userspace|fake]
"""
from __future__ import annotations

import argparse
import os
import time

from bench.common import nats_server, run_benchmark, wireguard_place
from events import subjects
from events.bus import Bus
from schemas.sealing import generate_keypair, generate_psk, seal
from schemas.signing import PeerSigner
from gateway_worker.app import Gateway
from wireguard.testing import FakeBackend
from wireguard.userspace import UserspaceBackend
from gateway_worker.settings import GatewaySettings
from schemas.common import utcnow
from schemas.events import PeerAuthorized
from schemas.rpc import GatewayCredentials


async def timed(coro) -> float:  # type: ignore[no-untyped-def]
    began = time.perf_counter()
    await coro
    return time.perf_counter() - began


async def timed_resync(gateway: Gateway) -> tuple[float, dict]:
    """A resync's time and what it wrote: peers added, updated, removed, left alone."""
    began = time.perf_counter()
    synced = await gateway.resync()
    return time.perf_counter() - began, {k: getattr(synced, k) for k in ("added", "updated", "removed", "unchanged")}


SIGNER = PeerSigner(b"b" * 32)  # plays the core's key


async def run_size(url: str, size: int, location_id: int, backend_kind: str, netns: str | None) -> dict:
    bus = await Bus.connect(url, "bench", wait_s=5)
    await bus.ensure_streams()
    sealing_private, sealing_public = generate_keypair()
    credentials = GatewayCredentials(location_id=location_id, location_name=f"bench{size}", private_key=generate_keypair()[0],
                                     sealing_private_key=sealing_private, listen_port=40000 + location_id,
                                     address="10.200.0.1/16", network="10.200.0.0/14", mfa_required=True,
                                     core_signing_key=SIGNER.public_key)
    keys = [generate_keypair()[1] for _ in range(size)]

    async def authorize(device: int, generation: int) -> None:
        state = SIGNER.sign(PeerAuthorized(location_id=location_id, device_id=device, generation=generation, pubkey=keys[device],
                               allowed_ips=[f"10.{200 + device // 65000}.{device // 250 % 256}.{device % 250 + 2}/32"],
                               keepalive_s=25, psk_sealed=seal(sealing_public, generate_psk()), authorized_at=utcnow(),
                               threshold_s=300))
        await bus.publish(subjects.peer(location_id, device), state)

    for device in range(size):
        await authorize(device, 1)
    backend = UserspaceBackend() if backend_kind == "userspace" else FakeBackend()
    settings = GatewaySettings(nats_url=url, gateway_id="bench", stats_interval=3600, netns=netns,
                               interface=f"wgb{location_id}{os.getpid() % 1000}")
    gateway = Gateway(settings, credentials, backend, bus=bus)
    await backend.ensure_interface(gateway.interface)

    snapshot = await timed(gateway.snapshot())
    cold, _ = await timed_resync(gateway)
    read = await timed(backend.status())
    warm, warm_writes = await timed_resync(gateway)
    for device in range(0, size, 100):  # 1 % re-authorized with new PSKs
        await authorize(device, 2)
    changed, changed_writes = await timed_resync(gateway)
    assert len((await backend.status()).peers) == size
    # no healthy peer touched: a warm resync writes nothing, the 1 % one only the 1 %
    assert warm_writes == {"added": 0, "updated": 0, "removed": 0, "unchanged": size}, warm_writes
    assert changed_writes["updated"] == len(range(0, size, 100)) and changed_writes["added"] == 0, changed_writes
    await backend.remove_interface()
    await bus.close()
    return {
        "peers": size,
        "snapshot_read_s": snapshot,
        "interface_read_s": read,
        "cold_resync_s": cold,
        "warm_resync_s": warm,
        "one_percent_changed_resync_s": changed,
        "one_percent_changed_writes": changed_writes,
        "healthy_peers_written": changed_writes["added"] + changed_writes["updated"] - len(range(0, size, 100)),
        "warm_vs_baselines": warm / (snapshot + read),
        "cold_vs_baselines": cold / (snapshot + read),
    }


async def main(args: argparse.Namespace) -> dict:
    with wireguard_place(args.backend) as (backend, netns), nats_server() as server:
        results = [await run_size(server.url, size, index + 1, backend, netns) for index, size in enumerate(args.sizes)]
    return {"backend": backend, "results": results}


def cli() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[1000, 10_000])
    parser.add_argument("--backend", choices=["userspace", "fake"])
    run_benchmark(parser, main, show)


def show(report: dict) -> None:
    print(f"backend {report['backend']}")
    for r in report["results"]:
        print(f"  {r['peers']:>6} peers: cold {r['cold_resync_s'] * 1000:8.0f} ms, warm {r['warm_resync_s'] * 1000:7.0f} ms, "
              f"1% changed {r['one_percent_changed_resync_s'] * 1000:7.0f} ms | baselines: snapshot "
              f"{r['snapshot_read_s'] * 1000:6.0f} ms + interface read {r['interface_read_s'] * 1000:6.0f} ms "
              f"-> warm {r['warm_vs_baselines']:.2f}x, cold {r['cold_vs_baselines']:.2f}x"
              f" | healthy peers written: {r['healthy_peers_written']}")


if __name__ == "__main__":
    cli()
