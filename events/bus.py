"""The NATS connection every service uses: events with envelopes, request/reply with
error replies, JetStream consumers that dead-letter what they cannot decode."""
from __future__ import annotations

import asyncio
import base64
import contextlib
import dataclasses
import json
import logging
import re
import ssl
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import nats
import nats.errors
import nats.js.errors
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js.api import AckPolicy as JsAckPolicy
from nats.js.api import ConsumerConfig, DeliverPolicy, PubAck
from prometheus_client import Counter
from pydantic import BaseModel, ValidationError

from events import headers as hdr
from events import permissions, streams, subjects
from runtime.errors import Invalid, Unavailable
from schemas import signing
from runtime.settings import BusSettings
from schemas.events import (
    PEER_STATE_ADAPTER,
    DeadLetter,
    Event,
    LoginApproved,
    PeerAuthorized,
    PeerRevoked,
    peer_state_order,
)
from schemas.rpc import ErrorStatus, RpcError, RpcFailure, RpcReply

log = logging.getLogger(__name__)

T = TypeVar("T")
Req = TypeVar("Req", bound=BaseModel)

WRONG_LAST_SEQUENCE = 10071
JETSTREAM_NOT_READY = {10005, 10008, 10074}  # no peers for placement yet; temporarily unavailable; insufficient resources (a cluster still forming)
MAX_DLQ_PAYLOAD = 8192
# In no registry of its own: each service's registry (its `metrics` module) registers it.
DEAD_LETTERS = Counter(
    "wgmfa_dead_letters", "Messages dead-lettered, by the service that gave up on them and the first two tokens of "
    "their subject", ["service", "subject"], registry=None,
)
_SECRET_KEYS = re.compile(r"code|token|psk|preshared|secret|password|private|signature|sealed", re.I)
_SECRET_PAIRS = re.compile(
    r'("[^"]*(?:code|token|psk|preshared|secret|password|private|signature|sealed)[^"]*"\s*:\s*)"[^"]*"?',
    re.I,
)


class BusUnavailable(Unavailable):
    """Raised when the bus or the service behind a subject did not answer."""


class PermanentFailure(Invalid):
    """Raised by a consumer's handler for a message that can never be processed: it is
    dead-lettered at once instead of redelivered."""


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


@dataclass
class _FreshlyNamed(ConsumerConfig):
    """A consumer config that takes a new random name every time a consumer is created
    from it (nats-py copies the config with `evolve` on each create, including when an
    ordered consumer recreates itself after a gap). Consumers are created by name
    (`$JS.API.CONSUMER.CREATE.<stream>.<name>.<filter>`) because the nameless form lets
    the body name any consumer, another role's durable included; the permissions allow
    the named form and deny the names of every durable."""

    def evolve(self, **params: Any) -> "_FreshlyNamed":
        fresh = dataclasses.replace(self, **params)
        fresh.name = f"ephemeral-{uuid.uuid4().hex[:16]}"
        return fresh


@dataclass
class PeerStateRecord:
    sequence: int
    state: PeerAuthorized | PeerRevoked | None  # None: the last message does not decode


SUBSCRIPTION_DRAIN_TIMEOUT_S = 5.0


class Bus:
    def __init__(self, nc: Client, service: str, *, publish_timeout_s: float = 5.0) -> None:
        self.nc = nc
        self.js = nc.jetstream(timeout=publish_timeout_s)
        self.service = service
        self.publish_timeout_s = publish_timeout_s
        self._tasks: set[asyncio.Task[Any]] = set()
        self._subscriptions: list[Any] = []
        self._consumers: list[asyncio.Task[Any]] = []
        self.closing = False
        # The core's: a last authorization that this key did not sign (a forgery by a
        # credential that may publish revokes) does not hold back the true next state.
        self.peer_signing_key: str | None = None

    # --- connection -------------------------------------------------------------------

    @classmethod
    async def connect(
        cls,
        url: str,
        service: str,
        *,
        publish_timeout_s: float = 5.0,
        wait_s: float | None = None,
        inbox_prefix: str = "_INBOX",
        nkey_seed: str | None = None,
        ca_file: Path | None = None,
    ) -> "Bus":
        """Connect, retrying until `wait_s` (None: forever); reconnect forever afterwards.
        With `nkey_seed`, authenticate with that NKey (the server sends a nonce, the seed
        signs it: no secret crosses the wire); `ca_file` trusts a private CA for tls:// URLs."""
        loop = asyncio.get_running_loop()
        deadline = None if wait_s is None else loop.time() + wait_s
        delay = 0.2

        bus: Bus | None = None
        auth: dict[str, Any] = {}
        if nkey_seed:
            auth["nkeys_seed_str"] = nkey_seed
        if ca_file is not None:
            auth["tls"] = ssl.create_default_context(cafile=str(ca_file))

        async def on_disconnected() -> None:
            if bus is not None and not bus.closing:
                log.warning("disconnected from NATS")

        async def on_reconnected() -> None:
            log.info("reconnected to NATS")

        async def on_error(exc: Exception) -> None:
            if bus is not None and not bus.closing:
                log.warning("NATS error: %s", exc)

        while True:
            try:
                # One round over the servers here (the loop below retries with backoff);
                # once connected, reconnect forever.
                nc = await nats.connect(
                    servers=[u.strip() for u in url.split(",") if u.strip()],
                    name=service,
                    connect_timeout=2,
                    allow_reconnect=True,
                    max_reconnect_attempts=1,
                    reconnect_time_wait=1,
                    drain_timeout=5,
                    inbox_prefix=inbox_prefix,
                    disconnected_cb=on_disconnected,
                    reconnected_cb=on_reconnected,
                    error_cb=on_error,
                    **auth,
                )
                nc.options["max_reconnect_attempts"] = -1
                bus = cls(nc, service, publish_timeout_s=publish_timeout_s)
                return bus
            except (OSError, nats.errors.Error, asyncio.TimeoutError) as exc:
                if deadline is not None and loop.time() + delay > deadline:
                    raise BusUnavailable(f"cannot connect to NATS at {url}: {exc or type(exc).__name__}") from None
                log.warning("waiting for NATS at %s: %s", url, exc or type(exc).__name__)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)

    @classmethod
    async def connect_as(
        cls, settings: BusSettings, role: str, service: str | None = None, *, wait_s: float | None = None
    ) -> "Bus":
        """Connect as `role` (events.permissions) with this process's credentials and the
        role's own inbox prefix, as the settings find them."""
        try:
            seed = settings.nkey_seed(role)
        except OSError as exc:
            raise BusUnavailable(f"cannot read the NATS credentials of {role}: {exc}") from None
        try:
            return await cls.connect(
                settings.nats_url,
                service or role,
                publish_timeout_s=settings.publish_timeout_s,
                wait_s=wait_s,
                inbox_prefix=settings.inbox_prefix or permissions.inbox_prefix(role),
                nkey_seed=seed,
                ca_file=settings.nats_ca_file,
            )
        except BusUnavailable as exc:
            if seed is None:
                where = settings.nats_nkey_file or settings.credentials_dir / f"{role}.nk"
                raise BusUnavailable(f"{exc}; no NATS credentials for {role} (none in {where})") from None
            raise

    async def wait_for_streams(self, *names: str, wait_s: float | None = None) -> None:
        """Wait until the core has declared these streams (only the core may create them)."""
        loop = asyncio.get_running_loop()
        deadline = None if wait_s is None else loop.time() + wait_s
        for name in names:
            while True:
                try:
                    await self.js.stream_info(name)
                    break
                except (nats.js.errors.NotFoundError, nats.errors.TimeoutError, asyncio.TimeoutError,
                        nats.js.errors.ServiceUnavailableError, nats.errors.NoRespondersError) as exc:
                    if deadline is not None and loop.time() > deadline:
                        raise BusUnavailable(f"stream {name} is not there: {exc or type(exc).__name__}") from None
                    log.info("waiting for stream %s (the core declares it)", name)
                    await asyncio.sleep(1)

    async def ensure_streams(
        self, replicas: int = 1, *, limits: streams.StreamLimits | None = None, wait_s: float = 60.0
    ) -> None:
        """Declare the streams, waiting while a starting cluster elects its JetStream leader."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + wait_s
        while True:
            try:
                await streams.ensure_streams(self.js, replicas, limits)
                return
            except (nats.js.errors.ServiceUnavailableError, nats.errors.TimeoutError, asyncio.TimeoutError,
                    nats.js.errors.NoStreamResponseError) as exc:
                reason = exc
            except nats.js.errors.APIError as exc:
                if exc.err_code not in JETSTREAM_NOT_READY:
                    raise
                reason = exc
            if loop.time() > deadline:
                raise BusUnavailable(f"JetStream is not available: {reason}")
            log.warning("waiting for JetStream: %s", reason)
            await asyncio.sleep(1)

    async def close(self) -> None:
        self.closing = True
        for task in self._consumers:
            task.cancel()
        await asyncio.gather(*self._consumers, return_exceptions=True)
        for sub in self._subscriptions:
            try:
                # bounded: a subscription's drain waits for its queue to empty, and a queue
                # whose reader has already gone never does
                await asyncio.wait_for(sub.drain(), SUBSCRIPTION_DRAIN_TIMEOUT_S)
            except Exception:  # connection already gone, or the queue never emptied
                with contextlib.suppress(Exception):
                    await sub.unsubscribe()
        if self._tasks:
            await asyncio.wait(self._tasks, timeout=5)
        if not self.nc.is_closed:
            try:
                await self.nc.drain()
            except Exception:
                await self.nc.close()

    @property
    def connected(self) -> bool:
        return self.nc.is_connected

    # --- events -----------------------------------------------------------------------

    async def publish(
        self,
        subject: str,
        event: Event,
        *,
        expected_last_subject_seq: int | None = None,
        timeout: float | None = None,
    ) -> PubAck:
        """Publish to JetStream with `Nats-Msg-Id` = event_id and wait for the ack."""
        headers = {hdr.MSG_ID: str(event.event_id), hdr.SERVICE: self.service}
        if expected_last_subject_seq is not None:
            headers[hdr.EXPECTED_LAST_SUBJECT_SEQUENCE] = str(expected_last_subject_seq)
        return await self.js.publish(
            subject,
            event.model_dump_json().encode(),
            headers=headers,
            timeout=timeout or self.publish_timeout_s,
        )

    async def publish_event(self, event: Event) -> PubAck:
        """An audit event on wgmfa.events.<type>."""
        return await self.publish(subjects.event(event.type), event)

    async def notify(self, subject: str, event: Event) -> None:
        """Core NATS, no stream: a wake-up call that carries no secret."""
        await self.nc.publish(subject, event.model_dump_json().encode(), headers={hdr.MSG_ID: str(event.event_id)})

    async def notify_login_approved(self, event: LoginApproved) -> None:
        await self.notify(subjects.notify_login(event.login_id), event)

    # --- peer state: a compacted log ordered by generation --------------------------

    async def last_peer_state(self, location_id: int, device_id: int) -> PeerStateRecord | None:
        try:
            raw = await self.js.get_last_msg(streams.PEERS.name, subjects.peer(location_id, device_id))
        except nats.js.errors.NotFoundError:
            return None
        try:
            state = PEER_STATE_ADAPTER.validate_json(raw.data or b"")
        except ValidationError:
            log.error("undecodable peer state at sequence %s; treating the subject as empty", raw.seq)
            return PeerStateRecord(sequence=raw.seq or 0, state=None)
        return PeerStateRecord(sequence=raw.seq or 0, state=state)

    def _forged(self, state: PeerAuthorized | PeerRevoked) -> bool:
        if self.peer_signing_key is None or not isinstance(state, PeerAuthorized):
            return False
        try:
            signing.verify(state, self.peer_signing_key)
        except signing.SignatureInvalid:
            log.warning("the last state of device %s at location %s is not the core's; replacing it",
                        state.device_id, state.location_id)
            return True
        return False

    async def publish_peer_state(self, state: PeerAuthorized | PeerRevoked, *, attempts: int = 10) -> bool:
        """Compare-and-set: publish only over an older state (by generation), with the
        subject's last sequence expected, so that concurrent writers cannot put an older
        state last. True when `state` is (now) the subject's last message."""
        subject = subjects.peer(state.location_id, state.device_id)
        for _ in range(attempts):
            last = await self.last_peer_state(state.location_id, state.device_id)
            if last is not None and last.state is not None and not self._forged(last.state):
                if last.state.event_id == state.event_id:
                    return True
                if peer_state_order(last.state) >= peer_state_order(state):
                    log.info(
                        "not publishing %s generation %s on %s: %s generation %s is newer",
                        state.type, state.generation, subject, last.state.type, last.state.generation,
                    )
                    return False
            try:
                await self.publish(subject, state, expected_last_subject_seq=last.sequence if last else 0)
                return True
            except nats.js.errors.APIError as exc:
                if exc.err_code != WRONG_LAST_SEQUENCE:
                    raise
        raise BusUnavailable(f"could not publish to {subject}: the subject keeps changing")

    # --- request/reply ----------------------------------------------------------------

    async def request(self, subject: str, request: BaseModel, *, timeout: float) -> RpcReply:
        try:
            msg = await self.nc.request(subject, request.model_dump_json().encode(), timeout=timeout)
        except nats.errors.NoRespondersError:
            raise BusUnavailable(f"no service answers {subject}") from None
        except (nats.errors.TimeoutError, asyncio.TimeoutError):
            raise BusUnavailable(f"no reply on {subject} within {timeout:g} s") from None
        except nats.errors.ConnectionClosedError:
            raise BusUnavailable("not connected to NATS") from None
        try:
            return RpcReply.model_validate_json(msg.data)
        except ValidationError as exc:
            raise BusUnavailable(f"malformed reply on {subject}: {describe_validation_error(exc)}") from None

    async def call(self, subject: str, request: BaseModel, result_type: type[T], *, timeout: float) -> T:
        """request() that returns the typed result or raises RpcFailure."""
        reply = await self.request(subject, request, timeout=timeout)
        if not reply.ok or reply.error is not None:
            error = reply.error or RpcError(status=ErrorStatus.INTERNAL, message="error reply without a reason")
            raise RpcFailure(error.status, error.message, error.retry_after_s)
        return result_type.model_validate(reply.result or {})  # type: ignore[attr-defined]

    async def serve_rpc(
        self,
        subject: str,
        request_type: type[Req],
        handler: Callable[[Req], Awaitable[BaseModel | None]],
        *,
        queue: str = subjects.CORE_QUEUE,
        concurrency: int = 64,
    ) -> None:
        """Answer requests on `subject`; a request that does not decode gets an
        invalid_argument reply and a DLQ copy, and the service goes on."""
        limit = asyncio.Semaphore(concurrency)

        async def respond(msg: Msg, reply: RpcReply) -> None:
            if msg.reply:
                try:
                    await msg.respond(reply.model_dump_json(exclude_none=True).encode())
                except Exception as exc:
                    log.warning("could not answer on %s: %s", subject, exc)

        async def handle(msg: Msg) -> None:
            try:
                try:
                    request = request_type.model_validate_json(msg.data)
                except ValidationError as exc:
                    reason = f"invalid {request_type.__name__}: {describe_validation_error(exc)}"
                    await self.dead_letter(msg.subject, msg.data, msg.headers, reason)
                    await respond(msg, RpcReply(ok=False, error=RpcError(status=ErrorStatus.INVALID_ARGUMENT, message=reason)))
                    return
                try:
                    result = await handler(request)
                except RpcFailure as failure:
                    await respond(msg, RpcReply(ok=False, error=failure.error))
                    return
                except Exception:
                    log.exception("handler for %s failed", subject)
                    await respond(msg, RpcReply(ok=False, error=RpcError(status=ErrorStatus.INTERNAL, message="Internal server error")))
                    return
                await respond(msg, RpcReply(ok=True, result=result.model_dump(mode="json") if result else {}))
            finally:
                limit.release()

        async def on_message(msg: Msg) -> None:
            await limit.acquire()
            task = asyncio.create_task(handle(msg))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

        self._subscriptions.append(await self.nc.subscribe(subject, queue=queue, cb=on_message))

    # --- JetStream consumers ----------------------------------------------------------

    async def ordered_subscribe(
        self, subject: str, stream: str, config: ConsumerConfig, cb: Callable[[Msg], Awaitable[None]] | None = None
    ) -> Any:
        """An ordered (ephemeral) consumer of `stream` for this process alone."""
        named = _FreshlyNamed(**{f.name: getattr(config, f.name) for f in dataclasses.fields(ConsumerConfig)})
        return await self.js.subscribe(subject, stream=stream, ordered_consumer=True, config=named, cb=cb)

    async def dead_letter(self, subject: str, data: bytes, headers: dict[str, str] | None, reason: str) -> None:
        payload, encoding = redact_payload(data or b"")
        letter = DeadLetter(
            original_subject=subject,
            service=self.service,
            reason=reason,
            headers={k: str(v)[:256] for k, v in (headers or {}).items()},
            payload=payload,
            payload_encoding=encoding,  # type: ignore[arg-type]
        )
        log.warning("dead-lettered a message from %s: %s", subject, reason)
        DEAD_LETTERS.labels(self.service, ".".join(subject.split(".")[:2])).inc()
        try:
            await self.publish(subjects.dlq(subject), letter)
        except Exception as exc:
            log.error("could not publish the DLQ copy of a message from %s: %s", subject, exc)

    def consume(
        self,
        *,
        stream: str,
        durable: str | None,
        filter_subject: str,
        decode: Callable[[bytes], T],
        handler: Callable[[T, Msg], Awaitable[None]],
        deliver_policy: DeliverPolicy = DeliverPolicy.ALL,
        max_deliver: int = 10,
        ack_wait_s: float = 30,
        batch: int = 64,
        on_idle: Callable[[], Awaitable[None]] | None = None,
    ) -> asyncio.Task[None]:
        """Run a pull consumer in the background. Acks after the handler returns; a handler
        error redelivers with a growing delay, up to `max_deliver` (0: forever), then
        dead-letters; a message that does not decode, or whose handler raises
        PermanentFailure, is dead-lettered and terminated at once."""
        config = ConsumerConfig(
            durable_name=durable,
            ack_policy=JsAckPolicy.EXPLICIT,
            deliver_policy=deliver_policy,
            max_deliver=max_deliver if max_deliver > 0 else -1,
            ack_wait=ack_wait_s,
            filter_subject=filter_subject,
        )

        async def process(msg: Msg) -> None:
            try:
                item = decode(msg.data)
            except (ValidationError, ValueError) as exc:
                reason = describe_validation_error(exc) if isinstance(exc, ValidationError) else str(exc)
                await self.dead_letter(msg.subject, msg.data, msg.headers, f"undecodable: {reason}")
                await msg.term()
                return
            try:
                await handler(item, msg)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                delivered = msg.metadata.num_delivered
                if isinstance(exc, PermanentFailure) or 0 < max_deliver <= delivered:
                    log.exception("giving up on a message from %s after %s deliveries", msg.subject, delivered)
                    await self.dead_letter(msg.subject, msg.data, msg.headers, f"failed {delivered} times: {exc}")
                    await msg.term()
                else:
                    log.warning("handler for %s failed (delivery %s): %s", msg.subject, delivered, exc)
                    await msg.nak(delay=min(2.0 ** (delivered - 1), 30.0))
                return
            await msg.ack_sync()

        async def run() -> None:
            psub = None
            try:
                while True:
                    try:
                        if psub is None:
                            psub = await self.js.pull_subscribe(
                                filter_subject, durable=durable, stream=stream, config=config
                            )
                        try:
                            msgs = await psub.fetch(batch, timeout=1)
                        except (nats.errors.TimeoutError, asyncio.TimeoutError):
                            msgs = []
                        for msg in msgs:
                            await process(msg)
                        if not msgs and on_idle is not None:
                            await on_idle()
                    except asyncio.CancelledError:
                        raise
                    except Exception as exc:
                        log.warning("consumer on %s: %s; retrying", filter_subject, exc)
                        psub = None
                        await asyncio.sleep(1)
            finally:
                if psub is not None:
                    with contextlib.suppress(Exception):
                        await psub.unsubscribe()

        task = asyncio.create_task(run(), name=f"consume {filter_subject}")
        self._consumers.append(task)
        return task
