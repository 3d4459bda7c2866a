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
    code: StrictStr | None = Field(None, max_length=256, description="wgmfa's own: the code `admin mobile allow` printed")


class RemoteMfaSuccess(BaseModel):
    """The one frame the desktop's socket receives when a phone approved its login."""

    type: str = "mfa_success"
    preshared_key: str


# --- enrollment (Defguard's apps; proto names, unknown fields ignored) -----------------------


class EnrollmentStartRequest(_Request):
    token: StrictStr = Field(max_length=512)


class NewDeviceRequest(_Request):
    name: StrictStr = Field(max_length=256)
    pubkey: StrictStr = Field(max_length=256)


class ExistingDeviceRequest(_Request):
    pubkey: StrictStr = Field(max_length=256)


class CodeMfaSetupStartRequest(_Request):
    method: StrictInt32 = Field(ge=0, le=4)


class CodeMfaSetupFinishRequest(_Request):
    code: StrictStr = Field(max_length=64)
    method: StrictInt32 | None = Field(None, ge=0, le=4, description="ignored: the method started decides")


class ActivateUserRequest(_Request):
    """Defguard's last enrollment step sets a password; wgmfa has none and stores nothing."""

    password: StrictStr | None = Field(None, max_length=1024)
    phone_number: StrictStr | None = Field(None, max_length=64)


class InstanceInfoRequest(_Request):
    token: StrictStr = Field(max_length=512)
class OpenIdAuthInfoRequest(_Request):
    """Defguard's `auth_info`: for the MFA flow, `state` is the MFA login token."""

    state: StrictStr = Field(max_length=512)
    type: StrictStr = Field(max_length=32)


class OpenIdAuthInfoResponse(BaseModel):
    url: str
    button_display_name: str | None = None


class OpenIdCallbackRequest(_Request):
    """What the provider sent the browser back with (the callback page posts it)."""

    state: StrictStr = Field(max_length=512)
    type: StrictStr = Field(max_length=32)
    code: StrictStr | None = Field(None, max_length=2048)
    iss: StrictStr | None = Field(None, max_length=512)
    error: StrictStr | None = Field(None, max_length=256)
