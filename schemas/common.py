"""Enumerations and small value types shared by every model."""
from __future__ import annotations

import os
import time
import uuid
from datetime import datetime, timezone
from enum import IntEnum, StrEnum
from typing import Annotated

from pydantic import Field, StrictInt

# Every integer in the contract is bounded, so that an absurd number is a validation error
# (400 at the edge, a dead letter on the bus) and never reaches SQL or arithmetic.
INT32_MIN, INT32_MAX = -(2**31), 2**31 - 1
Int32 = Annotated[int, Field(ge=INT32_MIN, le=INT32_MAX)]
"""Ids, counts and durations: what the database's INTEGER columns hold."""
StrictInt32 = Annotated[StrictInt, Field(ge=INT32_MIN, le=INT32_MAX)]
"""An Int32 that must arrive as a JSON integer (the HTTP API)."""
Int64 = Annotated[int, Field(ge=-(2**63), le=2**63 - 1)]
"""Byte counters."""


class MfaMethod(IntEnum):
    """The wire numbers of Defguard's `MfaMethod`; the HTTP API sends them as integers."""

    TOTP = 0
    EMAIL = 1
    OIDC = 2
    BIOMETRIC = 3
    MOBILE_APPROVE = 4


class MfaMode(StrEnum):
    DISABLED = "disabled"
    INTERNAL = "internal"
    EXTERNAL = "external"


class LoginState(StrEnum):
    PENDING = "pending"
    APPROVED = "approved"
    FINISHED = "finished"
    FAILED = "failed"
    EXPIRED = "expired"


class SessionState(StrEnum):
    AUTHORIZED = "authorized"
    CONNECTED = "connected"
    REVOKED = "revoked"


class RevokeReason(StrEnum):
    IDLE = "idle"
    NEVER_CONNECTED = "never_connected"
    LIFETIME = "lifetime"
    ADMIN = "admin"
    REPLACED = "replaced"
    USER_DISABLED = "user_disabled"


LIVE_SESSION_STATES = (SessionState.AUTHORIZED, SessionState.CONNECTED)
LIVE_LOGIN_STATES = (LoginState.PENDING, LoginState.APPROVED)


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


def uuid7(millis: int | None = None, rand: int | None = None) -> uuid.UUID:
    """A UUIDv7 (RFC 9562): 48-bit Unix milliseconds, then random bits, so ids sort by time.
    Given `millis` and `rand` (80 bits), the same id every time."""
    if millis is None:
        millis = time.time_ns() // 1_000_000
    if rand is None:
        rand = int.from_bytes(os.urandom(10), "big")
    value = (millis & ((1 << 48) - 1)) << 80
    value |= 0x7 << 76  # version
    value |= ((rand >> 62) & 0xFFF) << 64  # rand_a, 12 bits
    value |= 0b10 << 62  # variant
    value |= rand & ((1 << 62) - 1)  # rand_b, 62 bits
    return uuid.UUID(int=value)


def method_name(method: MfaMethod) -> str:
    """The name events and the database use: totp, email, oidc, biometric, mobile_approve."""
    return method.name.lower()
