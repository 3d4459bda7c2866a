"""The contract: envelopes, ordering of peer states, subject names."""
from __future__ import annotations

import json
import time
import uuid
from pathlib import Path

import pytest

from events import headers, nats_direct, streams, subjects
from schemas.sealing import ReplyKey, SealError, generate_keypair, generate_psk, public_key_of, seal, unseal
from schemas.common import RevokeReason, utcnow, uuid7
from schemas.events import ANY_EVENT_ADAPTER, PeerAuthorized, PeerRevoked, UserCreated, peer_state_order


def test_event_ids_are_uuid7_in_time_order() -> None:
    first = uuid7()
    time.sleep(0.002)
    second = uuid7()
    assert first.version == 7 and first.variant == uuid.RFC_4122
    assert first < second


def test_events_are_plain_json_with_the_envelope_first() -> None:
    event = UserCreated(user_id=1, username="alice")
    document = json.loads(event.model_dump_json())
    assert list(document)[:4] == ["event_id", "type", "version", "occurred_at"]
    assert document["type"] == "admin.user_created" and document["version"] == 1
    assert ANY_EVENT_ADAPTER.validate_json(event.model_dump_json()) == event


def test_unknown_versions_and_types_do_not_decode() -> None:
    document = json.loads(UserCreated(user_id=1, username="a").model_dump_json())
    with pytest.raises(ValueError):
        ANY_EVENT_ADAPTER.validate_python({**document, "version": 2})
    with pytest.raises(ValueError):
        ANY_EVENT_ADAPTER.validate_python({**document, "type": "admin.nonsense"})


def test_a_higher_generation_wins_and_a_revoke_follows_its_authorize() -> None:
    def authorize(generation: int) -> PeerAuthorized:
        return PeerAuthorized(location_id=1, device_id=1, generation=generation, pubkey="k", allowed_ips=[],
                              keepalive_s=25, authorized_at=utcnow())

    def revoke(generation: int) -> PeerRevoked:
        return PeerRevoked(location_id=1, device_id=1, generation=generation, pubkey="k", reason=RevokeReason.IDLE)

    assert peer_state_order(revoke(1)) > peer_state_order(authorize(1))
    assert peer_state_order(authorize(2)) > peer_state_order(revoke(1))
    assert peer_state_order(revoke(1)) < peer_state_order(authorize(2))


def test_subjects() -> None:
    assert subjects.peer(3, 7) == "wgmfa.peer.3.7"
    assert subjects.parse_peer("wgmfa.peer.3.7") == (3, 7)
    assert subjects.event("mfa.started") == "wgmfa.events.mfa.started"
    assert subjects.events_filter("mfa.*") == "wgmfa.events.mfa.*"
    assert subjects.events_filter("wgmfa.dlq.>") == "wgmfa.dlq.>"
    assert subjects.dlq("wgmfa.rpc.mfa.start") == "wgmfa.dlq.wgmfa.rpc.mfa.start"
    for bad in ("a.b", "*", ">", "a b", ""):
        with pytest.raises(ValueError):
            subjects.token(bad)


def test_a_subject_template_has_no_device_login_or_connection_in_it() -> None:
    """What metrics label a message by: a bounded set however many devices there are."""
    assert subjects.template_of(subjects.peer(3, 7)) == subjects.template_of(subjects.peer(4, 9)) == subjects.PEER_TEMPLATE
    assert subjects.template_of(subjects.stats(3, "gw1")) == subjects.STATS_TEMPLATE
    assert subjects.template_of(subjects.dlq(subjects.peer(3, 7))) == subjects.DLQ_TEMPLATE
    assert subjects.template_of(subjects.notify_login("abc")) == subjects.NOTIFY_LOGIN_TEMPLATE
    assert subjects.template_of(subjects.RPC_MFA_START) == subjects.RPC_MFA_START
    assert subjects.template_of(subjects.event("mfa.started")) == "wgmfa.events.mfa.started"
    assert subjects.template_of("_INBOX_proxy.Xy1.7") == "_INBOX_proxy.>"
    assert subjects.template_of("elsewhere.a.b.c") == "elsewhere.a.>"


def test_sealed_boxes_open_only_with_the_recipient_key() -> None:
    private, public = generate_keypair()
    assert public_key_of(private) == public
    psk = generate_psk()
    sealed = seal(public, psk)
    assert psk not in sealed
    assert unseal(private, sealed).decode() == psk
    with pytest.raises(SealError):
        unseal(generate_keypair()[0], sealed)
    with pytest.raises(SealError):
        seal("not-a-key", "x")
    reply = ReplyKey()
    assert reply.open(seal(reply.public, "hello")) == "hello"


def test_log_lines_are_scrubbed_of_keys_and_secret_query_parameters() -> None:
    from runtime.logs import scrub

    key = generate_psk()
    line = scrub(f'"GET /api/v1/client-mfa/remote?token=abc123&x=1" psk {key} /cb?code=654321&state=s3cr3t')
    assert "abc123" not in line and key not in line and "654321" not in line and "s3cr3t" not in line
    assert "x=1" in line and "[redacted]" in line and "[key]" in line


async def test_a_published_event_is_the_message_the_asyncapi_document_describes(nats_url: str, tmp_path: Path) -> None:
    """Plain JSON of the event in its stream, with its content type, its id as correlation
    id and as NATS's deduplication id, and the publishing service; a second publish of the
    same event is not stored again."""
    from core_service.app import Core
    from core_service.settings import CoreSettings
    from events.bus import Bus

    core = Core(CoreSettings(nats_url=nats_url, state_dir=tmp_path))
    await core.start()  # declares the streams
    bus = await Bus.connect(nats_url, "test", wait_s=5)
    try:
        event = UserCreated(user_id=1, username="alice")
        ack = await bus.publish_event(event)
        assert ack.stream == streams.EVENTS.name
        stored = await nats_direct.stored_message(bus.broker, streams.EVENTS.name, ack.seq)
        assert stored.subject == "wgmfa.events.admin.user_created"
        assert ANY_EVENT_ADAPTER.validate_json(stored.data) == event
        assert {name: stored.headers[name] for name in (headers.CONTENT_TYPE, headers.CORRELATION_ID, headers.MSG_ID,
                                                        headers.SERVICE)} == {
            headers.CONTENT_TYPE: "application/json", headers.CORRELATION_ID: str(event.event_id),
            headers.MSG_ID: str(event.event_id), headers.SERVICE: "test",
        }
        again = await bus.publish_event(event)
        assert again.duplicate and again.seq == ack.seq
        with pytest.raises(ValueError, match="no publisher"):  # only what the document declares goes out
            await bus.publish("wgmfa.events.anything", event.model_copy(update={"type": "admin.unknown"}))
    finally:
        await bus.close()
        await core.stop()
