"""The core's master key and what derives from it: encryption at rest and the RPC key."""
from __future__ import annotations

import base64
import binascii
import math
import os
import secrets
import string
import uuid
from pathlib import Path

from nacl.exceptions import CryptoError
from nacl.hash import blake2b
from nacl.encoding import RawEncoder
from nacl.public import PrivateKey
from nacl.secret import SecretBox
from nacl.utils import random

from runtime.errors import Invalid
from schemas.sealing import b64encode, unseal
from schemas.signing import PeerSigner

_PREFIX = "v1:"


_TOKEN_ALPHABET = string.ascii_letters + string.digits


def new_token(bits: int) -> str:
    """A random token of at least `bits` bits, letters and digits only.

    People paste these into shells and the Defguard apps; a URL-safe base64 token may begin
    with "-", which a command line then reads as an option.
    """
    length = math.ceil(bits / math.log2(len(_TOKEN_ALPHABET)))
    return "".join(secrets.choice(_TOKEN_ALPHABET) for _ in range(length))


class SecretKeyError(Invalid):
    """Raised when WGMFA_SECRET_KEY is not 32 bytes of base64, or a stored secret cannot be
    decrypted with it (the key changed)."""


def load_master_key(configured: str | None, state_dir: Path) -> bytes:
    """The configured key, else the state directory's key file, created on first use."""
    if configured:
        try:
            key = base64.b64decode(configured, validate=True)
        except (binascii.Error, ValueError):
            raise SecretKeyError("WGMFA_SECRET_KEY is not valid base64") from None
        if len(key) != 32:
            raise SecretKeyError("WGMFA_SECRET_KEY must be 32 bytes (base64)")
        return key
    path = state_dir / "core-secret.key"
    if path.exists():
        return load_master_key(path.read_text().strip(), state_dir)
    state_dir.mkdir(parents=True, exist_ok=True)
    key = random(32)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(b64encode(key) + "\n")
    return key


ENROLLMENT_COOKIE = "enroll"  # with the prefix, at most the 16 bytes blake2b personalises with
OIDC_COOKIE = "oidc"
COOKIE_PURPOSES = (ENROLLMENT_COOKIE, OIDC_COOKIE)


def _derive(master: bytes, purpose: bytes) -> bytes:
    return blake2b(b"", key=master, person=purpose, digest_size=32, encoder=RawEncoder)


class Vault:
    """Encrypts secrets at rest (XSalsa20-Poly1305) and opens what was sealed to the core."""

    def __init__(self, master: bytes) -> None:
        self._box = SecretBox(_derive(master, b"wgmfa-at-rest"))
        rpc_private = PrivateKey(_derive(master, b"wgmfa-rpc-key"))
        self._rpc_private = b64encode(bytes(rpc_private))
        self.rpc_public_key = b64encode(bytes(rpc_private.public_key))
        self._code_key = _derive(master, b"wgmfa-codes")
        # A key of its own per kind of cookie that browsers and apps hold: they come back from
        # outside, and one can never be opened as another kind, or as a secret at rest.
        self._cookie_boxes = {
            purpose: SecretBox(_derive(master, b"wgmfa-ck-" + purpose.encode())) for purpose in COOKIE_PURPOSES
        }
        # the deployment's identity for mobile apps: stable for as long as the key is
        self.instance_id = str(uuid.UUID(bytes=_derive(master, b"wgmfa-instance")[:16], version=4))
        # signs every peer.authorized; gateways hold the public half (their credentials)
        self.peer_signer = PeerSigner(_derive(master, b"wgmfa-peer-sign"))

    def code_hash(self, login_id: uuid.UUID, code: str) -> str:
        """A keyed hash of an emailed code, bound to its login: a database dump alone does
        not let anyone try the million codes offline."""
        return blake2b(code.encode(), key=self._code_key, salt=login_id.bytes, digest_size=32, encoder=RawEncoder).hex()

    def seal_cookie(self, purpose: str, payload: str) -> str:
        """Authenticated encryption of a cookie's content, URL-safe base64 without padding:
        any core of the deployment opens it, no proxy keeps state for it."""
        return base64.urlsafe_b64encode(self._cookie_boxes[purpose].encrypt(payload.encode())).decode().rstrip("=")

    def open_cookie(self, purpose: str, value: str) -> str | None:
        """The content of a cookie of this purpose this deployment sealed; None for anything else."""
        try:
            raw = base64.urlsafe_b64decode(value + "=" * (-len(value) % 4))
            return self._cookie_boxes[purpose].decrypt(raw).decode()
        except (CryptoError, ValueError, binascii.Error, UnicodeDecodeError):
            return None

    def encrypt(self, plaintext: str) -> str:
        return _PREFIX + b64encode(self._box.encrypt(plaintext.encode()))

    def decrypt(self, stored: str) -> str:
        if not stored.startswith(_PREFIX):
            raise SecretKeyError("unknown encryption format")
        try:
            return self._box.decrypt(base64.b64decode(stored[len(_PREFIX):])).decode()
        except CryptoError:
            raise SecretKeyError("stored secret cannot be decrypted with this key (WGMFA_SECRET_KEY changed?)") from None

    def open_sealed(self, sealed: str) -> str:
        """Opens a value a caller sealed to the RPC key; raises schemas.sealing.SealError."""
        return unseal(self._rpc_private, sealed).decode()
