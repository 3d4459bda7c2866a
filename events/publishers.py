"""Every message a service sends, declared once as a FastStream publisher with its payload
schema, so that the AsyncAPI document names each subject and its shape."""
from __future__ import annotations

import typing
from typing import Any

from faststream.nats import JStream, NatsBroker
from faststream.nats.publisher.usecase import LogicPublisher

from events import streams, subjects
from schemas.events import AuditEvent, DeadLetter, Event, LoginApproved, PeerState, StatsSample


def _stream(config: Any) -> JStream:
    # the core declares the streams with their limits (events.nats_direct); nobody else may
    return JStream(config.name, declare=False)


def audit_event_types() -> list[type[Event]]:
    union = typing.get_args(AuditEvent)[0]
    return list(typing.get_args(union))


class Publishers:
    def __init__(self, broker: NatsBroker, timeout_s: float) -> None:
        self.peer_state: LogicPublisher = broker.publisher(
            subjects.PEER_TEMPLATE, stream=_stream(streams.PEERS), schema=PeerState, timeout=timeout_s,
            title=subjects.PEER_TEMPLATE, description="The desired state of one device at one location (one message kept per "
            "subject; a later generation replaces an earlier one). Published with Nats-Expected-Last-Subject-Sequence.",
        )
        self.stats: LogicPublisher = broker.publisher(
            subjects.STATS_TEMPLATE, stream=_stream(streams.STATS), schema=StatsSample, timeout=timeout_s,
            title=subjects.STATS_TEMPLATE, description="A gateway's handshake sample of every peer of its interface.",
        )
        self.dlq: LogicPublisher = broker.publisher(
            subjects.DLQ_TEMPLATE, stream=_stream(streams.DLQ), schema=DeadLetter, timeout=timeout_s,
            title=subjects.DLQ_TEMPLATE, description="A message a service could not decode or process, with the reason "
            "and a redacted copy.",
        )
        self.notify_login: LogicPublisher = broker.publisher(
            subjects.NOTIFY_LOGIN_TEMPLATE, schema=LoginApproved, title=subjects.NOTIFY_LOGIN_TEMPLATE,
            description="Core NATS, no stream: a wake-up for the proxy waiting on a mobile approval; no secret.",
        )
        self.events: dict[str, LogicPublisher] = {}
        for model in audit_event_types():
            for event_type in typing.get_args(model.model_fields["type"].annotation):  # its Literal's values
                self.events[event_type] = broker.publisher(
                    subjects.event(event_type), stream=_stream(streams.EVENTS), schema=model, timeout=timeout_s,
                    title=subjects.event(event_type), description=(model.__doc__ or event_type).strip().splitlines()[0],
                )
