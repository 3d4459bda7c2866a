"""The bus every service uses: a FastStream `NatsBroker` with wgmfa's connection rules,
its publishers, request/reply with typed results and error replies, and the routers its
RPC endpoints and stream consumers are declared on (events.outcomes decides what becomes
of each message)."""
from __future__ import annotations

import asyncio
import functools
import logging
import ssl
import typing
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

from faststream import AckPolicy
from faststream.nats import AckPolicy as JsAckPolicy
from faststream.nats import ConsumerConfig, DeliverPolicy, JStream, NatsBroker, NatsRouter, PubAck
from faststream.nats.prometheus.provider import NatsMetricsSettingsProvider
from faststream.nats.security import NatsNKey, NatsSecurity
from faststream.prometheus import PrometheusMiddleware
from faststream.prometheus.container import MetricsContainer
from faststream.prometheus.manager import MetricsManager
from faststream.prometheus.middleware import BasePrometheusMiddleware
from faststream.prometheus.types import ProcessingStatus
from prometheus_client import CollectorRegistry, Counter
from pydantic import BaseModel, TypeAdapter, ValidationError

from events import headers as hdr
from events import nats_direct, permissions, streams, subjects
from events.errors import BusUnavailable, PermanentFailure
from events.outcomes import describe_validation_error, redact_payload, rpc_outcomes, stream_outcomes
from events.publishers import Publishers
from runtime.settings import BusSettings
from schemas.events import DeadLetter, Event, LoginApproved, PeerAuthorized, PeerRevoked, StatsSample
from schemas.rpc import ErrorStatus, RpcError, RpcFailure, RpcReply

__all__ = ["Bus", "BusUnavailable", "PermanentFailure", "describe_validation_error"]

log = logging.getLogger(__name__)

T = TypeVar("T")
S = TypeVar("S")

STOP_TIMEOUT_S = 10.0
# how long a service waits at its start for JetStream to answer (a cluster electing its leaders)
JETSTREAM_WAIT_S = 60.0
RPC_CONCURRENCY = 16  # requests of one client-facing subject a process handles at once
ADMIN_RPC_CONCURRENCY = 4  # an administrator's commands come one by one
# Messages a durable consumer's server hands out before their acks: enough that delivery
# does not wait on each ack, few enough that a stopped process's share comes back (after
# its ack wait) in small number, and as many as the messages that may wait for a retry
# (a negative ack with a delay) before the others wait with them.
CONSUMER_MAX_ACK_PENDING = 256
# In no registry of its own: each service's registry (its `metrics` module) registers it.
DEAD_LETTERS = Counter(
    "wgmfa_dead_letters", "Messages dead-lettered, by the service that gave up on them and the first two tokens of "
    "their subject", ["service", "subject"], registry=None,
)


class _SubjectTemplates(NatsMetricsSettingsProvider):
    """FastStream's NATS metrics settings, with a message's subject labelled by its
    template: FastStream's own label is the subject itself, one time series per device for
    the peer stream's consumers, which grew the services' memory and `/metrics` with every
    device and cost a new set of histogram buckets on a device's first message."""

    def get_consume_attrs_from_message(self, msg: Any) -> Any:
        attrs = super().get_consume_attrs_from_message(msg)
        attrs["destination_name"] = subjects.template_of(attrs["destination_name"])
        return attrs


_SUBJECT_TEMPLATES = _SubjectTemplates()


class _ReceivedMessages(BasePrometheusMiddleware):  # type: ignore[type-arg]
    """FastStream's metrics of one message a subscriber takes, without FastStream's
    metrics of an RPC's reply: sending the reply is part of the handling already timed,
    and those metrics (under `faststream_published_*`, labelled with the caller's inbox)
    cost a tenth of an RPC's CPU. The services' events go out through `Bus.publish`, which
    these middlewares never wrapped."""

    async def publish_scope(self, call_next: Callable[[Any], Any], cmd: Any) -> Any:
        return await call_next(cmd)


class SeriesOnce(MetricsManager):
    """FastStream's metrics manager, with each series of a received message looked up once
    and kept: FastStream looks up every series by its labels for every message (seven
    lookups, each checking and sorting the label names under a lock), which was a
    twentieth of the core's CPU per login. The series are as many as the subject
    templates, statuses and exception types, as before."""

    __slots__ = ("_series",)

    def __init__(self, container: MetricsContainer, *, app_name: str) -> None:
        super().__init__(container, app_name=app_name)
        self._series: dict[tuple[str, ...], Any] = {}

    def _of(self, metric: str, broker: str, handler: str, **extra: str) -> Any:
        key = (metric, broker, handler, *extra.values())
        series = self._series.get(key)
        if series is None:
            series = self._series[key] = getattr(self._container, metric).labels(
                app_name=self._app_name, broker=broker, handler=handler, **extra
            )
        return series

    def add_received_message(self, broker: str, handler: str, amount: int = 1, **custom_labels: str) -> None:
        self._of("received_messages_total", broker, handler, **custom_labels).inc(amount)

    def observe_received_messages_size(self, broker: str, handler: str, size: int, **custom_labels: str) -> None:
        self._of("received_messages_size_bytes", broker, handler, **custom_labels).observe(size)

    def add_received_message_in_process(self, broker: str, handler: str, amount: int = 1, **custom_labels: str) -> None:
        self._of("received_messages_in_process", broker, handler, **custom_labels).inc(amount)

    def remove_received_message_in_process(
        self, broker: str, handler: str, amount: int = 1, **custom_labels: str
    ) -> None:
        self._of("received_messages_in_process", broker, handler, **custom_labels).dec(amount)

    def add_received_processed_message(
        self, broker: str, handler: str, status: ProcessingStatus, amount: int = 1, **custom_labels: str
    ) -> None:
        self._of("received_processed_messages_total", broker, handler, status=status.value, **custom_labels).inc(amount)

    def observe_received_processed_message_duration(
        self, duration: float, broker: str, handler: str, **custom_labels: str
    ) -> None:
        self._of("received_processed_messages_duration_seconds", broker, handler, **custom_labels).observe(duration)

    def add_received_processed_message_exception(
        self, broker: str, handler: str, exception_type: str, **custom_labels: str
    ) -> None:
        self._of(
            "received_processed_messages_exceptions_total", broker, handler, exception_type=exception_type,
            **custom_labels,
        ).inc()


class MessageMetrics(PrometheusMiddleware):  # type: ignore[type-arg]
    """FastStream's Prometheus middleware for a service's subscribers (one message each:
    every subscriber here fetches or receives one at a time), labelled by subject
    template."""

    def __init__(self, registry: CollectorRegistry, service: str) -> None:
        super().__init__(settings_provider_factory=lambda _msg: _SUBJECT_TEMPLATES, registry=registry, app_name=service)
        self._metrics_manager = SeriesOnce(self._metrics_container, app_name=service)

    def __call__(self, msg: Any, /, *, context: Any) -> _ReceivedMessages:
        return _ReceivedMessages(
            msg, metrics_manager=self._metrics_manager, settings_provider_factory=self._settings_provider_factory,
            context=context, custom_labels=self._static_labels,
        )


class Bus:
    def __init__(
        self,
        broker: NatsBroker,
        service: str,
        *,
        publish_timeout_s: float = 5.0,
        inbox_prefix: str = "_INBOX",
        registry: CollectorRegistry | None = None,
    ) -> None:
        self.broker = broker
        # FastStream's Prometheus middleware, on the routers (what this service takes in)
        # rather than the broker: on the broker it also wraps every publish, and a login
        # publishes five messages; those are counted by the domain metrics and the streams
        self.message_metrics: list[Any] = []
        if registry is not None:
            self.message_metrics.append(MessageMetrics(registry, service))
        self.service = service
        self.inbox_prefix = inbox_prefix  # the connection's
        self.publish_timeout_s = publish_timeout_s
        self.publishers = Publishers(broker, publish_timeout_s)
        self.closing = False

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
        registry: CollectorRegistry | None = None,
    ) -> "Bus":
        """Connect, retrying until `wait_s` (None: forever); reconnect forever afterwards.
        With `nkey_seed`, authenticate with that NKey (the server sends a nonce, the seed
        signs it: no secret crosses the wire); `ca_file` trusts a private CA for tls:// URLs.
        With `registry`, FastStream's Prometheus middleware counts every message its
        subscribers take there."""
        loop = asyncio.get_running_loop()
        deadline = None if wait_s is None else loop.time() + wait_s
        delay = 0.2
        bus: Bus | None = None
        tls = ssl.create_default_context(cafile=str(ca_file)) if ca_file is not None else None
        security: NatsSecurity | None = None
        if nkey_seed:
            security = NatsNKey.from_seed(nkey_seed, ssl_context=tls)
        elif tls is not None:
            security = NatsSecurity(ssl_context=tls)

        async def on_disconnected() -> None:
            if bus is not None and not bus.closing:
                log.warning("disconnected from NATS")

        async def on_reconnected() -> None:
            log.info("reconnected to NATS")

        async def on_error(exc: Exception) -> None:
            if bus is not None and not bus.closing:
                log.warning("NATS error: %s", exc)

        while True:
            broker = NatsBroker(
                [u.strip() for u in url.split(",") if u.strip()],
                name=service,
                connect_timeout=2,
                allow_reconnect=True,
                # one round over the servers here (the loop retries with backoff); once
                # connected, reconnect forever (nats_direct.reconnect_forever)
                max_reconnect_attempts=1,
                reconnect_time_wait=1,
                drain_timeout=5,
                inbox_prefix=inbox_prefix,
                disconnected_cb=on_disconnected,
                reconnected_cb=on_reconnected,
                error_cb=on_error,
                security=security,
                logger=None,  # our own log lines say what happened; FastStream's per-message lines are noise
                apply_types=False,  # each subscriber's decoder validates its payload (payload_decoder)
                graceful_timeout=STOP_TIMEOUT_S,
            )
            try:
                await broker.connect()
                nats_direct.reconnect_forever(broker)
                bus = cls(broker, service, publish_timeout_s=publish_timeout_s, inbox_prefix=inbox_prefix,
                          registry=registry)
                await broker.start()  # its publishers; routers come with serve()
                return bus
            except nats_direct.CONNECT_ERRORS as exc:
                current = asyncio.current_task()
                if current is not None and current.cancelling():
                    # nats-py retries its servers on any error, a cancel that landed as a
                    # connection was refused included: the wait stops here all the same
                    raise asyncio.CancelledError from None
                if deadline is not None and loop.time() + delay > deadline:
                    raise BusUnavailable(f"cannot connect to NATS at {url}: {exc or type(exc).__name__}") from None
                log.warning("waiting for NATS at %s: %s", url, exc or type(exc).__name__)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)

    @classmethod
    async def connect_as(
        cls,
        settings: BusSettings,
        role: str,
        service: str | None = None,
        *,
        wait_s: float | None = None,
        registry: CollectorRegistry | None = None,
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
                registry=registry,
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
                    await nats_direct.stream_state(self.broker, name)
                    break
                except nats_direct.StreamMissing as exc:
                    if deadline is not None and loop.time() > deadline:
                        raise BusUnavailable(str(exc)) from None
                    log.info("waiting for stream %s (the core declares it)", name)
                    await asyncio.sleep(1)

    async def ensure_streams(
        self, replicas: int = 1, *, limits: streams.StreamLimits | None = None, wait_s: float = JETSTREAM_WAIT_S
    ) -> None:
        """Declare the streams, waiting while a starting cluster elects its JetStream leader."""
        await self._when_jetstream_answers(
            "the streams", lambda: nats_direct.declare_streams(self.broker, replicas, limits, timeout=self.publish_timeout_s),
            wait_s,
        )

    async def serve(self, *routers: NatsRouter, wait_s: float = JETSTREAM_WAIT_S) -> None:
        """Start these routers' subscribers (the connection is already up, and the broker
        started with it: FastStream's `start` would start every subscriber again), and
        return once the server has their subscriptions, so that a request sent next finds
        them. A durable consumer is made again while JetStream cannot answer for a moment
        (a node of the cluster lost as the service starts), rather than failing the start."""
        for router in routers:
            for stream, config in router.durables if isinstance(router, StreamRouter) else ():
                await self._when_jetstream_answers(
                    f"consumer {config.durable_name}",
                    functools.partial(nats_direct.push_in_place_of_pull, self.broker, stream, config, timeout=self.publish_timeout_s),
                    wait_s,
                )
            self.broker.include_router(router)
            for subscriber in router.subscribers:
                # nats-py keeps nothing of a subscription whose consumer was not made, so
                # starting it again creates (or binds to) the durable afresh
                await self._when_jetstream_answers(f"subscriber {subscriber.subject.broker_address}", subscriber.start, wait_s)
        await nats_direct.client(self.broker).flush()

    async def _when_jetstream_answers(self, what: str, request: Callable[[], Awaitable[None]], wait_s: float) -> None:
        """Make `request` again, once a second, while JetStream says it cannot answer for now;
        BusUnavailable when it still cannot after `wait_s`. Any other error is raised at once."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + wait_s
        while True:
            try:
                await request()
                return
            except Exception as exc:
                reason = nats_direct.jetstream_not_ready(exc)
                if reason is None:
                    raise
            if loop.time() > deadline:
                raise BusUnavailable(f"JetStream is not available for {what}: {reason}")
            log.warning("waiting for JetStream (%s): %s", what, reason)
            await asyncio.sleep(1)

    async def close(self) -> None:
        self.closing = True
        try:
            # bounded: a handler that never returns must not hold a stop for ever
            await asyncio.wait_for(self.broker.stop(), STOP_TIMEOUT_S + 5)
        except Exception as exc:
            log.warning("closing the NATS connection: %s", exc or type(exc).__name__)
            connection = self.broker.connection
            if connection is not None and not connection.is_closed:
                await connection.close()

    @property
    def connected(self) -> bool:
        return nats_direct.is_connected(self.broker)

    # --- routers ----------------------------------------------------------------------

    def router(self) -> "EventRouter":
        """A router for plain subscribers (no replies, no stream)."""
        return EventRouter(self)

    def rpc_router(self) -> "RpcRouter":
        return RpcRouter(self)

    def stream_router(self, *, max_deliver: int = 10) -> "StreamRouter":
        return StreamRouter(self, max_deliver)

    # --- events -----------------------------------------------------------------------

    def _publisher_for(self, subject: str, event: Event) -> Any:
        if isinstance(event, (PeerAuthorized, PeerRevoked)):
            return self.publishers.peer_state
        if isinstance(event, StatsSample):
            return self.publishers.stats
        if isinstance(event, DeadLetter):
            return self.publishers.dlq
        publisher = self.publishers.events.get(event.type)
        if publisher is None:
            raise ValueError(f"no publisher for {event.type} on {subject}")
        return publisher

    async def publish(
        self,
        subject: str,
        event: Event,
        *,
        expected_last_subject_seq: int | None = None,
        timeout: float | None = None,
    ) -> PubAck:
        """Publish to JetStream with `Nats-Msg-Id` = event_id and wait for the ack.

        The message is the one the subject's FastStream publisher (events.publishers, which
        the AsyncAPI document is made of) would send: the event's JSON, its content type and
        correlation id, into that publisher's stream. It goes out through nats-py's
        JetStream client directly: FastStream's publish path around it (a command object,
        the middleware stack, its codec) was a third of a publish's CPU, and a login
        publishes four."""
        event_id = str(event.event_id)
        headers = {
            hdr.CONTENT_TYPE: "application/json", hdr.CORRELATION_ID: event_id,
            hdr.MSG_ID: event_id, hdr.SERVICE: self.service,
        }
        if expected_last_subject_seq is not None:
            headers[hdr.EXPECTED_LAST_SUBJECT_SEQUENCE] = str(expected_last_subject_seq)
        stream = self._publisher_for(subject, event).stream.name
        return await nats_direct.jetstream(self.broker, self.publish_timeout_s).publish(
            subject, event.model_dump_json().encode(), timeout=timeout or self.publish_timeout_s,
            stream=stream, headers=headers,
        )

    async def publish_event(self, event: Event) -> PubAck:
        """An audit event on wgmfa.events.<type>."""
        return await self.publish(subjects.event(event.type), event)

    async def notify_login_approved(self, event: LoginApproved) -> None:
        """Core NATS, no stream: a wake-up call that carries no secret."""
        await self.publishers.notify_login.publish(
            event, subject=subjects.notify_login(event.login_id), headers={hdr.MSG_ID: str(event.event_id)},
            correlation_id=str(event.event_id),
        )

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

    # --- request/reply ----------------------------------------------------------------

    async def request(self, subject: str, request: BaseModel, *, timeout: float) -> RpcReply:
        try:
            msg = await self.broker.request(request, subject, timeout=timeout)
        except nats_direct.NO_RESPONDERS:
            raise BusUnavailable(f"no service answers {subject}") from None
        except nats_direct.TIMEOUTS:
            raise BusUnavailable(f"no reply on {subject} within {timeout:g} s") from None
        except nats_direct.NOT_CONNECTED:
            raise BusUnavailable("not connected to NATS") from None
        try:
            return RpcReply.model_validate_json(msg.body)
        except ValidationError as exc:
            raise BusUnavailable(f"malformed reply on {subject}: {describe_validation_error(exc)}") from None

    async def call(self, subject: str, request: BaseModel, result_type: type[T], *, timeout: float) -> T:
        """request() that returns the typed result or raises RpcFailure."""
        reply = await self.request(subject, request, timeout=timeout)
        if not reply.ok or reply.error is not None:
            error = reply.error or RpcError(status=ErrorStatus.INTERNAL, message="error reply without a reason")
            raise RpcFailure(error.status, error.message, error.retry_after_s)
        return result_type.model_validate(reply.result or {})  # type: ignore[attr-defined]


def payload_type(handler: Callable[..., Any]) -> Any:
    """The one payload a subscriber's handler takes (its type hint)."""
    hints = typing.get_type_hints(handler)
    arguments = [name for name in hints if name != "return"]
    if len(arguments) != 1:
        raise TypeError(f"{getattr(handler, '__qualname__', handler)} must take exactly its payload model")
    return hints[arguments[0]]


def payload_decoder(handler: Callable[..., Any]) -> Callable[[Any], Awaitable[Any]]:
    """The decoder of a subscriber whose handler takes one payload model: the message's
    JSON validated straight into it by pydantic's own parser, and handed to the handler
    as it is (the broker runs with apply_types=False). FastStream's default parsed the
    JSON with the json module and then had FastDepends validate the dict into a model it
    builds around the handler's arguments: a tenth of the core's CPU per login. A body
    that does not validate raises pydantic's ValidationError inside the subscriber's
    middlewares (events.outcomes), as before."""
    adapter = TypeAdapter(payload_type(handler))

    async def decode(message: Any) -> Any:
        return adapter.validate_json(message.body)

    return decode


def log_context_once(subscriber: S) -> S:
    """The subscriber, with the log context FastStream puts in every message's scope made
    once. FastStream builds it for each message from the subscriber's subject, which it
    composes anew each time (an Address object and every router's prefix): 9 µs of a
    no-op RPC's 98 (the server's CPU per request of bench.rpc's endpoint, seven
    alternating rounds), and a login's messages are three. The subject, queue and stream
    cannot change once the broker runs, so the first message's context is kept and only
    the message id changes."""
    build = subscriber.get_log_context  # type: ignore[attr-defined]
    fixed: dict[str, str] = {}

    def get_log_context(message: Any) -> dict[str, str]:
        if message is None:  # not a message's (the broker registering it, before it runs)
            return build(None)
        if not fixed:
            fixed.update(build(None))
        return {**fixed, "message_id": getattr(message, "message_id", "")}

    subscriber.get_log_context = get_log_context  # type: ignore[attr-defined]
    return subscriber


class ServiceRouter(NatsRouter):
    """A router of a service's subscribers, each with its log context made once
    (log_context_once)."""

    def subscriber(self, *args: Any, **kwargs: Any) -> Any:
        return log_context_once(super().subscriber(*args, **kwargs))


class EventRouter(ServiceRouter):
    """Plain subscribers (no replies, no stream): each handler takes its message model."""

    def __init__(self, bus: Bus) -> None:
        super().__init__(middlewares=bus.message_metrics)

    def listen(self, subject: str, handler: Callable[..., Any]) -> None:
        self.subscriber(subject, title=subject)(handler, decoder=payload_decoder(handler))


class RpcRouter(ServiceRouter):
    """RPC endpoints: each handler takes its request model and returns its result model
    (events.outcomes wraps it in the reply envelope); the AsyncAPI document names both."""

    def __init__(self, bus: Bus) -> None:
        self.request_names: dict[str, str] = {}
        self.replies: dict[str, Any] = {}  # subject -> result type, for the AsyncAPI document
        super().__init__(middlewares=[*bus.message_metrics, rpc_outcomes(bus, self.request_names)])

    def endpoint(
        self, subject: str, handler: Callable[..., Any], *, queue: str = subjects.CORE_QUEUE,
        concurrency: int | None = None,
    ) -> None:
        request = payload_type(handler)
        decoder = payload_decoder(handler)
        self.request_names[subject] = getattr(request, "__name__", "request")
        self.replies[subject] = typing.get_type_hints(handler).get("return")
        # `concurrency` subscribers of the queue group, each taking one request at a time:
        # FastStream's concurrent subscriber (max_workers) costs several times more CPU per
        # message than its plain one (bench.rpc), about a fifth of the core's CPU per login
        # (a request waits only when the subscriber NATS hands it to is busy: a slow SMTP or
        # OpenID provider holds up at most the requests that land on the subscribers it holds)
        if concurrency is None:
            concurrency = ADMIN_RPC_CONCURRENCY if subject.startswith(subjects.RPC_ADMIN_PREFIX) else RPC_CONCURRENCY
        for worker in range(concurrency):
            self.subscriber(subject, queue=queue, title=subject if worker == 0 else f"{subject} #{worker + 1}",
                            include_in_schema=worker == 0)(handler, decoder=decoder)


class StreamRouter(ServiceRouter):
    """Stream consumers: a failure redelivers with a growing delay up to `max_deliver`
    (0: forever), then dead-letters; see events.outcomes."""

    def __init__(self, bus: Bus, max_deliver: int) -> None:
        self.max_deliver = max_deliver
        self.payloads: dict[str, Any] = {}  # channel -> message type, for the AsyncAPI document's tests
        self.durables: list[tuple[str, ConsumerConfig]] = []  # (stream, the durable's push config)
        self.inbox_prefix = bus.inbox_prefix  # a role may subscribe to its own inbox only
        super().__init__(middlewares=[*bus.message_metrics, stream_outcomes(bus, max_deliver)])

    def consumer(
        self,
        handler: Callable[..., Any],
        *,
        stream: str,
        durable: str,
        filter_subject: str,
        deliver_policy: DeliverPolicy = DeliverPolicy.ALL,
        ack_wait_s: float = 30,
        title: str | None = None,
    ) -> None:
        """A durable consumer shared by every process of a role (its deliver group), each
        handling its messages one at a time, so that a subject's messages are handled in
        order. The server pushes them to the group's processes, at most
        `CONSUMER_MAX_ACK_PENDING` unacknowledged, on a subject of the role's inbox named
        after the durable: whichever process (re)created the consumer, all of them listen
        where it delivers. A pull consumer, one fetch request per
        message (and FastStream's pull loop starting a task group for each), cost the
        consumer 2.2 times the CPU per message and the server 1.9 times when messages came
        one by one, 5 and 15 times with a backlog."""
        self.payloads[title or filter_subject] = payload_type(handler)
        config = ConsumerConfig(
            name=durable,  # created by name and filter: the one create a role's permissions allow
            durable_name=durable,
            deliver_group=durable,
            deliver_subject=f"{self.inbox_prefix}.{durable}",
            filter_subject=filter_subject,
            deliver_policy=deliver_policy,
            ack_policy=JsAckPolicy.EXPLICIT,
            max_deliver=self.max_deliver if self.max_deliver > 0 else -1,
            ack_wait=ack_wait_s,
            max_ack_pending=CONSUMER_MAX_ACK_PENDING,
        )
        self.durables.append((stream, config))
        self.subscriber(
            filter_subject,
            stream=JStream(stream, declare=False),
            queue=durable,  # nats-py's durable name too (FastStream warns when `durable` is given with a push consumer)
            deliver_policy=deliver_policy,
            config=config,
            ack_policy=AckPolicy.NACK_ON_ERROR,
            title=title or filter_subject,
        )(handler, decoder=payload_decoder(handler))
