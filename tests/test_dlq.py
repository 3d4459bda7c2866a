"""A message that does not decode goes to the DLQ with its reason, and the service goes on."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from core_service.app import Core
from core_service.settings import CoreSettings
from events import subjects
from events.bus import Bus, redact_payload
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
        routes = [subject for subject, _, _ in core._routes()]
        assert subjects.RPC_MFA_START in routes and subjects.RPC_MFA_FINISH in routes
        for subject in routes:
            for payload in MALFORMED:
                reply = RpcReply.model_validate_json((await bus.nc.request(subject, payload, timeout=5)).data)
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
