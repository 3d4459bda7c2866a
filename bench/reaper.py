"""Reaper ingestion: peer samples per second, through the bus and in memory, against the
same run's baselines (reading the same messages from JetStream without decoding them,
and JSON-parsing them without the liveness bookkeeping).

    .venv/bin/python -m bench.reaper [--peers 10000] [--samples 20]
"""
from __future__ import annotations

import argparse
import json
import time
from datetime import datetime, timedelta, timezone

from faststream.nats import DeliverPolicy

from bench.common import nats_server, run_benchmark
from events import nats_direct, streams, subjects
from events.bus import Bus
from runtime.testing import FakeClock
from schemas.sealing import generate_keypair
from reaper_worker.app import Reaper, ReaperSettings
from reaper_worker.liveness import Liveness
from schemas.common import uuid7
from schemas.events import STATS_ADAPTER, PeerSample, StatsSample

PER_MESSAGE = 1000  # what a gateway puts in one message


def make_samples(peers: int, rounds: int) -> list[StatsSample]:
    keys = [generate_keypair()[1] for _ in range(peers)]
    now = datetime.now(timezone.utc)
    samples = []
    for r in range(rounds):
        sampled_at = now + timedelta(seconds=30 * r)
        for start in range(0, peers, PER_MESSAGE):
            chunk = [PeerSample(pubkey=k, latest_handshake=sampled_at - timedelta(seconds=i % 150), rx_bytes=i, tx_bytes=i)
                     for i, k in enumerate(keys[start:start + PER_MESSAGE])]
            samples.append(StatsSample(location_id=1, gateway_id=f"gw{r % 2}", sample_id=uuid7(), sampled_at=sampled_at,
                                       part=start // PER_MESSAGE + 1, parts=-(-peers // PER_MESSAGE), peers=chunk))
    return samples


async def main(args: argparse.Namespace) -> dict:
    samples = make_samples(args.peers, args.samples)
    total_peers = sum(len(s.peers) for s in samples)
    payloads = [s.model_dump_json().encode() for s in samples]

    # in memory: decode + bookkeeping, against decode alone
    began = time.perf_counter()
    for payload in payloads:
        json.loads(payload)
    parse_only = time.perf_counter() - began
    liveness = Liveness()
    began = time.perf_counter()
    for payload in payloads:
        liveness.on_sample(STATS_ADAPTER.validate_json(payload), 0.0)
    in_memory = time.perf_counter() - began

    with nats_server() as server:
        bus = await Bus.connect(server.url, "bench", wait_s=5)
        await bus.ensure_streams()
        for sample in samples:
            await bus.publish(subjects.stats(1, sample.gateway_id), sample)

        # baseline: the same messages read from JetStream, undecoded, through the same kind
        # of ordered consumer the reaper replays with
        sub = await nats_direct.ordered_subscribe(bus.broker, subjects.STATS_ALL, streams.STATS.name, DeliverPolicy.ALL)
        began = time.perf_counter()
        for _ in payloads:
            await sub.next_msg(timeout=30)
        raw_read = time.perf_counter() - began
        await sub.unsubscribe()

        # the reaper's own start-up replay of the same messages
        reaper = Reaper(ReaperSettings(nats_url=server.url, sweep_interval_s=3600), clock=FakeClock(), bus=bus)
        began = time.perf_counter()
        await reaper.start()
        replay = time.perf_counter() - began
        await reaper.stop()
        await bus.close()

    return {
        "peer_samples": total_peers,
        "messages": len(payloads),
        "reaper_replay_per_s": total_peers / replay,
        "jetstream_read_only_per_s": total_peers / raw_read,
        "in_memory_per_s": total_peers / in_memory,
        "json_parse_only_per_s": total_peers / parse_only,
        "replay_vs_jetstream_read": raw_read / replay,
        "in_memory_vs_json_parse": parse_only / in_memory,
    }


def cli() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--peers", type=int, default=10_000)
    parser.add_argument("--samples", type=int, default=20, help="rounds of samples (every peer in each)")
    run_benchmark(parser, main, show)


def show(report: dict) -> None:
    print(f"{report['peer_samples']} peer samples in {report['messages']} messages")
    print(f"  reaper, through NATS (replay)      {report['reaper_replay_per_s']:12,.0f} peer samples/s")
    print(f"  JetStream read, no decoding        {report['jetstream_read_only_per_s']:12,.0f} peer samples/s")
    print(f"  reaper, in memory                  {report['in_memory_per_s']:12,.0f} peer samples/s")
    print(f"  json.loads only                    {report['json_parse_only_per_s']:12,.0f} peer samples/s")
    print(f"  through NATS: {report['replay_vs_jetstream_read']:.2f}x the bare read rate; "
          f"in memory: {report['in_memory_vs_json_parse']:.2f}x the bare parse rate")


if __name__ == "__main__":
    cli()
