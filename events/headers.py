"""NATS header names wgmfa sets or reads."""
from typing import Final

MSG_ID: Final = "Nats-Msg-Id"
"""Deduplication id; always the event's `event_id`."""

EXPECTED_LAST_SUBJECT_SEQUENCE: Final = "Nats-Expected-Last-Subject-Sequence"
"""Compare-and-set on a subject: the publish fails unless the subject's last sequence matches."""

SERVICE: Final = "Wgmfa-Service"
"""The publishing service, for operators reading DLQ copies."""

CONTENT_TYPE: Final = "content-type"
"""`application/json` on every event, as FastStream sets it on what its publishers send."""

CORRELATION_ID: Final = "correlation_id"
"""The event's `event_id` again, FastStream's name for it (docs/asyncapi.yaml)."""
