"""A message that does not decode goes to the DLQ with its reason, and the service goes on."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from core_service.app import Core
from core_service.settings import CoreSettings
from events import nats_direct
from events import subjects
from events.bus import Bus, RpcRouter, redact_payload
from schemas import rpc
from schemas.rpc import RpcReply
from tests.support.stack import eventually, read_stream

MALFORMED = [
    b"{not json",
    b'{"unexpected": 1}',
    b"\xff\xfe\x00binary",
    b'{"token_sealed": "abc", "code_sealed": "123456", "reply_key": 5, "secret": "hunter2"}',
]


async def test_every_core_subject_dead_letters_malformed_requests_and_keeps_serving(nats_url: str, tmp_path: Path) -> None:
    core = Core(CoreSettings(nats_url=nats_url, state_dir=tmp_path))
    await core.start()
    bus = await Bus.connect(nats_url, "test", wait_s=5)
    try:
        routes = await rpc_subjects(bus, tmp_path / "routes")
        assert subjects.RPC_MFA_START in routes and subjects.RPC_MFA_FINISH in routes
        for subject in routes:
            for payload in MALFORMED:
                reply = RpcReply.model_validate_json((await nats_direct.client(bus.broker).request(subject, payload, timeout=5)).data)
                assert not reply.ok and reply.error.status == "invalid_argument", (subject, reply)
            # the next valid request is served
            valid = await bus.request(subjects.RPC_CORE_HELLO, rpc.CoreHello(), timeout=5)
            assert valid.ok

        letters = await eventually(
            lambda: _dlq_when(bus, len(routes) * len(MALFORMED)), timeout=10, what="every DLQ copy"
        )
        by_subject: dict[str, list[dict]] = {}
        for letter in letters:
            by_subject.setdefault(letter["original_subject"], []).append(letter)
        assert set(by_subject) == set(routes)
        for subject, copies in by_subject.items():
            assert {c["subject"] for c in copies} == {subjects.dlq(subject)}
            assert all(c["reason"] and c["service"] == "core" for c in copies)
            encodings = sorted(c["payload_encoding"] for c in copies)
            assert encodings == ["base64", "utf-8", "utf-8", "utf-8"]
        dump = json.dumps(letters)
        assert "hunter2" not in dump and "123456" not in dump
    finally:
        await bus.close()
        await core.stop()


async def rpc_subjects(bus: Bus, state_dir: Path) -> list[str]:
    """Every RPC subject the core serves, from the routers it builds (built here again on a
    core that never starts, so the running one is left alone)."""
    unstarted = Core(CoreSettings(nats_url="nats://unused", state_dir=state_dir))
    try:
        return [subject for router in unstarted.build(bus) if isinstance(router, RpcRouter)
                for subject in router.request_names]
    finally:
        await unstarted.db.close()


async def _dlq_when(bus: Bus, count: int) -> list[dict] | None:
    found = await read_stream(bus, subjects.DLQ_ALL, timeout=0.3)
    return found if len(found) >= count else None


@pytest.mark.parametrize(
    ("payload", "leak"),
    [
        (b'{"code": "123456", "nested": {"preshared_key": "c2VjcmV0"}}', ["123456", "c2VjcmV0"]),
        (b'{"token": "tok-abc", "code": "654321"', ["tok-abc", "654321"]),  # truncated JSON
    ],
)
def test_dlq_copies_mask_secret_looking_fields(payload: bytes, leak: list[str]) -> None:
    text, encoding = redact_payload(payload)
    assert encoding == "utf-8"
    for value in leak:
        assert value not in text
    assert "[redacted]" in text


async def test_malformed_peer_and_stats_messages_are_dead_lettered_by_every_consumer(nats_url: str, tmp_path: Path) -> None:
    from datetime import datetime, timezone

    from runtime.testing import FakeClock
    from schemas.sealing import generate_keypair
    from gateway_worker.app import Gateway
    from wireguard.testing import FakeBackend
    from gateway_worker.settings import GatewaySettings
    from reaper_worker.app import Reaper, ReaperSettings
    from schemas.common import utcnow, uuid7
    from schemas.events import PeerAuthorized, PeerSample, StatsSample
    from schemas.rpc import GatewayCredentials

    bus = await Bus.connect(nats_url, "test", wait_s=5)
    core = Core(CoreSettings(nats_url=nats_url, state_dir=tmp_path))
    await core.start()
    reaper = Reaper(ReaperSettings(nats_url=nats_url, sweep_interval_s=3600))  # each service its own connection
    await reaper.start()
    backend = FakeBackend()
    credentials = GatewayCredentials(location_id=1, location_name="x", private_key=generate_keypair()[0],
                                     sealing_private_key=generate_keypair()[0], listen_port=51820, address="10.1.0.1/24",
                                     network="10.1.0.0/24", mfa_required=False,
                                     core_signing_key=core.vault.peer_signer.public_key)
    gateway = Gateway(GatewaySettings(nats_url=nats_url, gateway_id="gw", stats_interval=3600), credentials, backend,
                      clock=FakeClock(datetime.now(timezone.utc)))
    await gateway.start()
    try:
        # the peer stream keeps one message per subject, so each bad one gets its own
        bad_peers, bad_stats = [subjects.peer(1, 5), subjects.peer(1, 6)], [subjects.stats(1, "gw5"), subjects.stats(1, "gw6")]
        for peer_bad, stats_bad in zip(bad_peers, bad_stats):
            payload = b'{"type": "peer.authorized", "generation": "x"}' if peer_bad.endswith("5") else b"\x00\xff"
            await nats_direct.client(bus.broker).publish(peer_bad, payload)
            await nats_direct.client(bus.broker).publish(stats_bad, payload)
        await nats_direct.client(bus.broker).flush()
        peer_subject, stats_subject = subjects.peer(1, 1), subjects.stats(1, "gw")
        pubkey = generate_keypair()[1]
        valid = core.vault.peer_signer.sign(PeerAuthorized(
            location_id=1, device_id=1, generation=1, pubkey=pubkey, allowed_ips=["10.1.0.2/32"], keepalive_s=25,
            authorized_at=utcnow(), threshold_s=300))
        await bus.publish(peer_subject, valid)
        now = datetime.now(timezone.utc)
        await bus.publish(stats_subject, StatsSample(location_id=1, gateway_id="gw", sample_id=uuid7(), sampled_at=now,
                                                     peers=[PeerSample(pubkey=pubkey, latest_handshake=now, rx_bytes=1, tx_bytes=1)]))
        # the valid messages after the bad ones are processed
        await eventually(lambda: pubkey in backend.peers, what="the gateway to apply the valid state")
        await eventually(lambda: (1, 1) in reaper.liveness.authorizations and reaper.liveness.handshakes,
                         what="the reaper to take the valid messages")

        async def letters() -> set[tuple[str, str]] | None:
            found = {(l["service"], l["original_subject"]) for l in await read_stream(bus, subjects.DLQ_ALL, timeout=0.3)}
            expected = {(service, subject) for service in ("core", "reaper") for subject in bad_peers + bad_stats}
            expected |= {("gateway gw", subject) for subject in bad_peers}
            return found if expected <= found else None

        await eventually(letters, timeout=15, what="DLQ copies from the core, the reaper and the gateway")
    finally:
        await gateway.stop()
        await reaper.stop()
        await core.stop()
        await bus.close()
