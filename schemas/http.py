"""The client-facing HTTP API: wire-compatible with Defguard's proxy (snake_case JSON,
`method` an integer, errors as {"error": "..."})."""
from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, StrictStr

from schemas.common import StrictInt32


class _Request(BaseModel):
    # Defguard's mobile client sends extra fields (posture_data); they are ignored.
    model_config = ConfigDict(extra="ignore")


class ClientMfaStartRequest(_Request):
    location_id: StrictInt32
    pubkey: StrictStr = Field(max_length=256)
    method: StrictInt32


class ClientMfaStartResponse(BaseModel):
    token: str
    challenge: str | None = None


class ClientMfaFinishRequest(_Request):
    token: StrictStr = Field(max_length=512)
    code: StrictStr | None = Field(None, max_length=512)
    auth_pub_key: StrictStr | None = Field(None, max_length=256)


class ClientMfaFinishResponse(BaseModel):
    preshared_key: str
    token: str | None = None


class ErrorResponse(BaseModel):
    error: str


class ClientMfaFinishRemoteRequest(ClientMfaFinishRequest):
    """The phone's approval of a desktop login: `code` is the Ed25519 signature of the
    challenge (base64), `auth_pub_key` the phone's registered key."""


class RegisterMobileRequest(_Request):
    auth_pub_key: StrictStr = Field(max_length=256)
    device_pub_key: StrictStr = Field(max_length=256)


class RemoteMfaSuccess(BaseModel):
    """The one frame the desktop's socket receives when a phone approved its login."""

    type: str = "mfa_success"
    preshared_key: str
