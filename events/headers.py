"""NATS header names wgmfa sets or reads."""
from typing import Final

MSG_ID: Final = "Nats-Msg-Id"
"""Deduplication id; always the event's `event_id`."""

EXPECTED_LAST_SUBJECT_SEQUENCE: Final = "Nats-Expected-Last-Subject-Sequence"
"""Compare-and-set on a subject: the publish fails unless the subject's last sequence matches."""

SERVICE: Final = "Wgmfa-Service"
"""The publishing service, for operators reading DLQ copies."""
