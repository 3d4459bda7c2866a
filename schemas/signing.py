"""The core's signature on peer authorizations (Ed25519, PyNaCl).

A gateway applies a `peer.authorized` only when the core signed it: anyone else who can
publish on the peer subjects (the reaper, whose job is revoking) cannot put a peer on an
interface. The signature covers every field that reaches the interface or decides the
peer's life: location, device, generation, session, public key, allowed IPs, keepalive,
sealed PSK, authorization time, expiry and threshold, in a canonical encoding.
"""
from __future__ import annotations

import base64
import binascii
import json
from datetime import datetime, timedelta, timezone

from nacl.exceptions import BadSignatureError
from nacl.signing import SigningKey, VerifyKey

from runtime.errors import Invalid

from schemas.events import PeerAuthorized

_EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)
_DOMAIN = b"wgmfa peer.authorized v1\n"


class SignatureInvalid(Invalid):
    """Raised by `verify` when the authorization is unsigned, or not signed by this key
    over these fields."""


def _micros(moment: datetime | None) -> int | None:
    return None if moment is None else (moment - _EPOCH) // timedelta(microseconds=1)


def signed_bytes(state: PeerAuthorized) -> bytes:
    fields = {
        "location_id": state.location_id,
        "device_id": state.device_id,
        "generation": state.generation,
        "session_id": state.session_id,
        "pubkey": state.pubkey,
        "allowed_ips": list(state.allowed_ips),
        "keepalive_s": state.keepalive_s,
        "psk_sealed": state.psk_sealed,
        "authorized_at": _micros(state.authorized_at),
        "expires_at": _micros(state.expires_at),
        "threshold_s": state.threshold_s,
    }
    return _DOMAIN + json.dumps(fields, sort_keys=True, separators=(",", ":")).encode()


class PeerSigner:
    """The core's signing key: an Ed25519 seed of 32 bytes."""

    def __init__(self, seed: bytes) -> None:
        self._key = SigningKey(seed)
        self.public_key = base64.b64encode(bytes(self._key.verify_key)).decode()

    def sign(self, state: PeerAuthorized) -> PeerAuthorized:
        signature = self._key.sign(signed_bytes(state)).signature
        return state.model_copy(update={"signature": base64.b64encode(signature).decode()})


def verify(state: PeerAuthorized, public_key: str) -> None:
    """Raises SignatureInvalid unless `public_key` signed exactly these fields."""
    if not state.signature:
        raise SignatureInvalid("unsigned authorization")
    try:
        key = VerifyKey(base64.b64decode(public_key, validate=True))
        signature = base64.b64decode(state.signature, validate=True)
    except (binascii.Error, ValueError, TypeError):
        raise SignatureInvalid("malformed signature or key") from None
    try:
        key.verify(signed_bytes(state), signature)
    except (BadSignatureError, ValueError):
        raise SignatureInvalid("the signature is not the core's over these fields") from None
