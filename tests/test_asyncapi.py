"""The AsyncAPI document: generated from the services' routers and publishers, checked in,
and naming every subject a service subscribes to or publishes on with its payload."""
from __future__ import annotations

import typing
from typing import Any
from urllib.parse import unquote

import pytest

from events.bus import RpcRouter, StreamRouter
from events.publishers import audit_event_types
from events import subjects
from wgmfa import contract

DOCUMENT = contract.document()
RPC = {subject: (router.request_names[subject], result) for router in contract.routers if isinstance(router, RpcRouter)
       for subject, result in router.replies.items()}
CONSUMED = {subject: payload for router in contract.routers if isinstance(router, StreamRouter)
            for subject, payload in router.payloads.items()}


def _resolve(ref: str) -> Any:
    node: Any = DOCUMENT
    for part in ref.removeprefix("#/").split("/"):
        node = node[unquote(part)]
    return node


def _operations(subject: str, action: str) -> list[dict[str, Any]]:
    return [op for op in DOCUMENT["operations"].values()
            if op["action"] == action and _resolve(op["channel"]["$ref"])["address"] == subject]


def _payload_titles(operation: dict[str, Any], key: str = "messages") -> set[str]:
    messages = operation["reply"]["messages"] if key == "reply" else operation["messages"]
    titles = set()
    for message in messages:
        payload = _resolve(message["$ref"])
        payload = _resolve(payload["$ref"]) if "$ref" in payload else payload
        schema = _resolve(payload["payload"]["$ref"]) if "$ref" in payload["payload"] else payload["payload"]
        titles.add(schema.get("title"))
        for option in schema.get("anyOf", []) + schema.get("oneOf", []):
            titles.add(_resolve(option["$ref"])["title"] if "$ref" in option else option.get("title"))
    return titles


def test_the_checked_in_document_is_what_the_code_generates(capsys: pytest.CaptureFixture[str]) -> None:
    assert contract.main(["--check"]) == 0, capsys.readouterr().err + " (regenerate with `python -m wgmfa.contract`)"


@pytest.mark.parametrize("subject", sorted(RPC))
def test_every_rpc_endpoint_is_documented_with_its_request_and_reply(subject: str) -> None:
    request, result = RPC[subject]
    (operation,) = _operations(subject, "receive")
    assert request in _payload_titles(operation)
    reply = _payload_titles(operation, "reply")
    assert reply == {f"{result.__name__}Reply"}
    envelope = _resolve(f"#/components/schemas/{result.__name__}Reply")
    assert {"$ref": f"#/components/schemas/{result.__name__}"} in envelope["properties"]["result"]["anyOf"]


@pytest.mark.parametrize("subject", sorted(CONSUMED))
def test_every_stream_consumer_is_documented_with_its_payload(subject: str) -> None:
    payload = CONSUMED[subject]
    expected = {t.__name__ for t in typing.get_args(payload)} or {payload.__name__}
    (operation,) = _operations(subject, "receive")
    assert expected <= _payload_titles(operation)


@pytest.mark.parametrize("model", audit_event_types(), ids=lambda m: m.__name__)
def test_every_audit_event_is_documented_on_its_subject(model: type) -> None:
    for event_type in typing.get_args(model.model_fields["type"].annotation):
        (operation,) = _operations(subjects.event(event_type), "send")
        assert _payload_titles(operation) == {model.__name__}


@pytest.mark.parametrize("subject, titles", [
    (subjects.PEER_TEMPLATE, {"PeerAuthorized", "PeerRevoked"}),
    (subjects.STATS_TEMPLATE, {"StatsSample"}),
    (subjects.DLQ_TEMPLATE, {"DeadLetter"}),
    (subjects.NOTIFY_LOGIN_TEMPLATE, {"LoginApproved"}),
])
def test_the_peer_log_stats_dead_letters_and_wakeups_are_documented(subject: str, titles: set[str]) -> None:
    (operation,) = _operations(subject, "send")
    assert titles <= _payload_titles(operation)


def test_the_proxy_subscribes_to_login_wakeups() -> None:
    (operation,) = _operations(subjects.NOTIFY_LOGIN_ALL, "receive")
    assert "LoginApproved" in _payload_titles(operation)
