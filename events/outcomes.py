"""What becomes of a message a subscriber handled: FastStream middlewares turn a handler's
return or exception into the reply, the ack, a later redelivery or a dead letter.

- RPC endpoints (`RpcOutcomes`): the handler returns its result model, which is sent as
  `RpcReply{ok: true, result}`; an `RpcFailure` is an error reply with its status; a request
  that does not decode is an `invalid_argument` reply plus a redacted DLQ copy; any other
  exception is an `internal` reply (and a log line with the traceback).
- Stream consumers (`StreamOutcomes`): success acks; a message that does not decode, or
  whose handler raises `PermanentFailure`, is dead-lettered and terminated at once; any
  other failure is redelivered after a growing delay (1 s, 2 s, 4 s … 30 s) until the
  consumer's `max_deliver`, then dead-lettered. `PermanentFailure`, like every `Invalid`
  (runtime.errors: a bad seal, a bad signature), is never retried.
"""
from __future__ import annotations

import base64
import json
import logging
import re
from collections.abc import Awaitable, Callable
from contextvars import ContextVar
from functools import partial
from typing import Any, Protocol

from faststream import BaseMiddleware
from faststream.exceptions import AckMessage, NackMessage, RejectMessage, SkipMessage
from pydantic import ValidationError

from runtime.errors import Invalid
from schemas.rpc import ErrorStatus, RpcError, RpcFailure, RpcReply

log = logging.getLogger(__name__)

MAX_DLQ_PAYLOAD = 8192
MAX_REDELIVERY_DELAY_S = 30.0
_SECRET_KEYS = re.compile(r"code|token|psk|preshared|secret|password|private|signature|sealed", re.I)
_SECRET_PAIRS = re.compile(
    r'("[^"]*(?:code|token|psk|preshared|secret|password|private|signature|sealed)[^"]*"\s*:\s*)"[^"]*"?',
    re.I,
)
_FLOW_CONTROL = (AckMessage, NackMessage, RejectMessage, SkipMessage)


def describe_validation_error(exc: ValidationError) -> str:
    """A reason without the offending values (they may be secrets)."""
    parts = []
    for error in exc.errors(include_url=False, include_input=False):
        where = ".".join(str(p) for p in error["loc"]) or "body"
        parts.append(f"{where}: {error['msg']}")
    return "; ".join(parts)[:1000]


def _redact_value(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: "[redacted]" if _SECRET_KEYS.search(str(k)) else _redact_value(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_redact_value(v) for v in value]
    return value


def redact_payload(data: bytes) -> tuple[str, str]:
    """(payload, encoding) for a DLQ copy: JSON with secret-looking fields masked, other text
    with `"…secret…": "…"` pairs masked, anything else base64; at most 8 KiB."""
    data = data[:MAX_DLQ_PAYLOAD]
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        return base64.b64encode(data).decode(), "base64"
    try:
        return json.dumps(_redact_value(json.loads(text))), "utf-8"
    except ValueError:
        return _SECRET_PAIRS.sub(r'\1"[redacted]"', text), "utf-8"


class DeadLetters(Protocol):
    async def dead_letter(self, subject: str, data: bytes, headers: dict[str, str] | None, reason: str) -> None: ...


def _original(msg: Any) -> tuple[str, bytes, dict[str, str] | None]:
    raw = msg.raw_message
    return raw.subject, raw.data or b"", raw.headers


class RpcOutcomes(BaseMiddleware):
    """Replies of an RPC endpoint; see the module docstring."""

    def __init__(self, msg: Any, *, context: Any, letters: DeadLetters, request_names: dict[str, str]) -> None:
        super().__init__(msg, context=context)
        self.letters = letters
        self.request_names = request_names

    async def consume_scope(self, call_next: Callable[[Any], Awaitable[Any]], msg: Any) -> Any:
        subject, data, headers = _original(msg)
        try:
            result = await call_next(msg)
        except ValidationError as exc:
            name = self.request_names.get(subject, "request")
            reason = f"invalid {name}: {describe_validation_error(exc)}"
            await self.letters.dead_letter(subject, data, headers, reason)
            return RpcReply(ok=False, error=RpcError(status=ErrorStatus.INVALID_ARGUMENT, message=reason))
        except RpcFailure as failure:
            return RpcReply(ok=False, error=failure.error)
        except Exception:
            log.exception("handler for %s failed", subject)
            return RpcReply(ok=False, error=RpcError(status=ErrorStatus.INTERNAL, message="Internal server error"))
        return RpcReply(ok=True, result=result.model_dump(mode="json") if result is not None else {})


# the JetStream metadata of the stream message being handled: for a handler, which takes
# its payload only (events.bus.payload_decoder)
_DELIVERY: ContextVar[Any] = ContextVar("wgmfa_stream_delivery", default=None)


def delivery_attempt() -> int:
    """Which delivery of the stream message being handled this is (1: the first)."""
    metadata = _DELIVERY.get()
    return metadata.num_delivered if metadata is not None else 1


def stream_sequence() -> int | None:
    """The stream sequence of the stream message being handled (None outside a handler)."""
    metadata = _DELIVERY.get()
    return metadata.sequence.stream if metadata is not None else None


class StreamOutcomes(BaseMiddleware):
    """Acks, redeliveries and dead letters of a stream consumer; see the module docstring."""

    def __init__(self, msg: Any, *, context: Any, letters: DeadLetters, max_deliver: int) -> None:
        super().__init__(msg, context=context)
        self.letters = letters
        self.max_deliver = max_deliver

    async def consume_scope(self, call_next: Callable[[Any], Awaitable[Any]], msg: Any) -> Any:
        subject, data, headers = _original(msg)
        delivery = _DELIVERY.set(msg.raw_message.metadata)
        try:
            return await call_next(msg)
        except _FLOW_CONTROL:
            raise
        except ValidationError as exc:
            reason = f"undecodable: {describe_validation_error(exc)}"
            await self.letters.dead_letter(subject, data, headers, reason)
            raise RejectMessage() from None
        except Exception as exc:
            delivered = msg.raw_message.metadata.num_delivered
            if isinstance(exc, Invalid) or 0 < self.max_deliver <= delivered:
                log.exception("giving up on a message from %s after %s deliveries", subject, delivered)
                await self.letters.dead_letter(subject, data, headers, f"failed {delivered} times: {exc}")
                raise RejectMessage() from None
            log.warning("handler for %s failed (delivery %s): %s", subject, delivered, exc)
            raise NackMessage(delay=min(2.0 ** (delivered - 1), MAX_REDELIVERY_DELAY_S)) from None
        finally:
            _DELIVERY.reset(delivery)


def rpc_outcomes(letters: DeadLetters, request_names: dict[str, str]) -> Callable[..., RpcOutcomes]:
    return partial(RpcOutcomes, letters=letters, request_names=request_names)


def stream_outcomes(letters: DeadLetters, max_deliver: int) -> Callable[..., StreamOutcomes]:
    return partial(StreamOutcomes, letters=letters, max_deliver=max_deliver)
