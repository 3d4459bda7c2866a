"""Ed25519 challenges, shared by the phone factors (biometric and mobile approve)."""
from __future__ import annotations

import base64
import binascii
import secrets
import string

from nacl.exceptions import BadSignatureError
from nacl.signing import VerifyKey

from schemas.sealing import SealError, b64decode_key

CHALLENGE_LENGTH = 44  # alphanumeric, as Defguard's: about 262 bits


def new_challenge() -> str:
    alphabet = string.ascii_letters + string.digits
    return "".join(secrets.choice(alphabet) for _ in range(CHALLENGE_LENGTH))


def signature_valid(public_key: str, challenge: str, signature: str) -> bool:
    """Ed25519 over the challenge's UTF-8 bytes; key and signature base64."""
    try:
        raw_signature = base64.b64decode(signature, validate=True)
        VerifyKey(b64decode_key(public_key, what="signing key")).verify(challenge.encode(), raw_signature)
        return True
    except (BadSignatureError, SealError, binascii.Error, ValueError, TypeError):
        return False
