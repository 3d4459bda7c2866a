"""X25519 keys and sealed boxes (libsodium via PyNaCl).

A sealed box can be opened only by the holder of the recipient's private key; wgmfa uses
them for every secret that crosses the bus: PSKs to gateways, codes and tokens to the
core, PSKs and tokens back to the proxy.
"""
from __future__ import annotations

import base64
import binascii

from nacl.exceptions import CryptoError
from nacl.public import PrivateKey, PublicKey, SealedBox
from nacl.utils import random

from runtime.errors import Invalid

KEY_LEN = 32


class SealError(Invalid):
    """Raised for a key or sealed value that cannot be used (not base64, not 32 bytes, not
    openable with this key); the message never contains the secret."""


def b64encode(raw: bytes) -> str:
    return base64.b64encode(raw).decode("ascii")


def b64decode_key(value: str, *, what: str = "key") -> bytes:
    """Standard base64 of exactly 32 bytes (WireGuard's key format)."""
    try:
        raw = base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError, TypeError):
        raise SealError(f"{what} is not valid base64") from None
    if len(raw) != KEY_LEN:
        raise SealError(f"{what} must be {KEY_LEN} bytes, got {len(raw)}")
    return raw


def is_key(value: str) -> bool:
    try:
        b64decode_key(value)
    except SealError:
        return False
    return True


def generate_keypair() -> tuple[str, str]:
    """(private, public) X25519 keys, base64, clamped as `wg genkey` does."""
    raw = bytearray(random(KEY_LEN))
    raw[0] &= 248
    raw[31] &= 127
    raw[31] |= 64
    private = PrivateKey(bytes(raw))
    return b64encode(bytes(private)), b64encode(bytes(private.public_key))


def public_key_of(private_key: str) -> str:
    return b64encode(bytes(PrivateKey(b64decode_key(private_key, what="private key")).public_key))


def generate_psk() -> str:
    """A WireGuard pre-shared key: 32 random bytes, base64 (44 characters)."""
    return b64encode(random(KEY_LEN))


def seal(public_key: str, plaintext: str | bytes) -> str:
    data = plaintext.encode() if isinstance(plaintext, str) else plaintext
    box = SealedBox(PublicKey(b64decode_key(public_key, what="recipient key")))
    return b64encode(box.encrypt(data))


def unseal(private_key: str, sealed: str) -> bytes:
    try:
        ciphertext = base64.b64decode(sealed, validate=True)
    except (binascii.Error, ValueError, TypeError):
        raise SealError("sealed value is not valid base64") from None
    try:
        box = SealedBox(PrivateKey(b64decode_key(private_key, what="private key")))
        return box.decrypt(ciphertext)
    except CryptoError:
        raise SealError("sealed value cannot be opened with this key") from None


class ReplyKey:
    """A per-process keypair: callers send `public` as `reply_key`, and open what comes back."""

    def __init__(self) -> None:
        self._private, self.public = generate_keypair()

    def open(self, sealed: str) -> str:
        return unseal(self._private, sealed).decode()
