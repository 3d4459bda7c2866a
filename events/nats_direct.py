"""The few places where wgmfa talks to nats-py underneath FastStream.

Everything else goes through the FastStream broker (events.bus): subscribers, publishers,
requests. These calls are here because FastStream 0.7 has no API for them:

- declaring the streams with their limits, replicas and discard policies, and waiting while
  a starting cluster elects its JetStream leader (FastStream's `JStream(declare=True)`
  merges subjects into whatever exists and has no limits of ours; only the core declares);
- reading the last message of a subject (the peer log's compare-and-set) and of every
  subject of a location (a gateway's snapshot, through a consumer with a name of its own,
  since permissions deny the nameless consumer create);
- ordered consumers created by a fresh name each time (permissions allow only the named
  create, and an ordered consumer recreates itself after a gap): the reaper's replay, which
  reads the backlog up to the stream's last sequence before it follows and needs the
  server's timestamps and stream sequences of each message, and `wgmfa events tail`, a
  reader for one person that starts where it is told (all, since a time, new) and keeps
  nothing on the server;
- reading a stored message by sequence (the server's clock, from the stamp on our own event);
- replacing a durable pull consumer an earlier version made with the push consumer of
  the same name (the server does not change a consumer's kind);
- keeping a connection's reconnect attempts bounded while connecting and unbounded once
  connected (nats-py reads one option for both).
"""
from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import uuid
import weakref
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import nats.errors
import nats.js.errors
from faststream.nats import NatsBroker
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import AckPolicy as JsAckPolicy
from nats.js.api import ConsumerConfig, DeliverPolicy, RawStreamMsg, StreamState

from events import streams

log = logging.getLogger(__name__)

WRONG_LAST_SEQUENCE = 10071
JETSTREAM_NOT_READY = {10005, 10008, 10074}  # no peers for placement yet; temporarily unavailable; insufficient resources (a cluster still forming)


# What an ordered consumer delivers: `.subject`, `.data`, `.headers`, and `.metadata` with
# the stream sequence and the server's timestamp (what its callers need it for).
StreamMsg = Msg


class StreamMissing(Exception):
    """A stream is not (yet) there."""


def client(broker: NatsBroker) -> Client:
    connection = broker.connection
    if connection is None:
        raise nats.errors.ConnectionClosedError()
    return connection


_CONTEXTS: weakref.WeakKeyDictionary[Client, dict[float, JetStreamContext]] = weakref.WeakKeyDictionary()


def jetstream(broker: NatsBroker, timeout: float) -> JetStreamContext:
    """The connection's JetStream client with this API timeout, made once: making one (its
    manager, the locks of its asynchronous publishing) cost a tenth of a publish."""
    connection = client(broker)
    contexts = _CONTEXTS.setdefault(connection, {})
    context = contexts.get(timeout)
    if context is None:
        context = contexts[timeout] = connection.jetstream(timeout=timeout)
    return context


def reconnect_forever(broker: NatsBroker) -> None:
    """Once connected, never give up reconnecting (the first connect is bounded by its caller)."""
    client(broker).options["max_reconnect_attempts"] = -1


def is_connected(broker: NatsBroker) -> bool:
    connection = broker.connection
    return connection is not None and connection.is_connected


def is_wrong_last_sequence(exc: BaseException) -> bool:
    return isinstance(exc, nats.js.errors.APIError) and exc.err_code == WRONG_LAST_SEQUENCE


# --- streams ---------------------------------------------------------------------------------


async def stream_state(broker: NatsBroker, name: str, *, timeout: float = 5.0) -> StreamState:
    try:
        return (await jetstream(broker, timeout).stream_info(name)).state
    except (nats.js.errors.NotFoundError, nats.errors.TimeoutError, asyncio.TimeoutError,
            nats.js.errors.ServiceUnavailableError, nats.errors.NoRespondersError) as exc:
        raise StreamMissing(f"stream {name} is not there: {exc or type(exc).__name__}") from None


REPLACE_ATTEMPTS = 5  # of a durable's replacement, against other processes of the role doing the same


async def push_in_place_of_pull(broker: NatsBroker, stream: str, config: ConsumerConfig, *, timeout: float = 5.0) -> None:
    """Make the durable consumer `config` names a push consumer, where an earlier version
    left it a pull consumer (the server will not turn one into the other): that one is
    deleted and this one created to go on after the last message the old one had
    acknowledged in order (messages it acknowledged beyond that come once more). Processes
    of a role starting together may each try: they compute the same start from the pull
    consumer, the first to create the push consumer wins, and the others see it (a create
    racing a delete fails on the server, and is tried again)."""
    js = jetstream(broker, timeout)
    name = config.durable_name
    assert name is not None
    current: Any = await _consumer_or_none(js, stream, name)
    if current is None or current.config.deliver_subject is not None:
        return  # none (its subscriber creates it) or pushed already
    acknowledged = current.ack_floor.stream_seq if current.ack_floor is not None else 0
    replacement = config
    if acknowledged:
        replacement = dataclasses.replace(
            config, deliver_policy=DeliverPolicy.BY_START_SEQUENCE, opt_start_seq=acknowledged + 1
        )
    for attempt in range(1, REPLACE_ATTEMPTS + 1):
        try:
            if current is not None:
                log.info("consumer %s on %s: replacing the pull consumer with a push consumer, from stream sequence %s",
                         name, stream, acknowledged + 1)
                await js.delete_consumer(stream, name)
            await js.add_consumer(stream, replacement)
            return
        except nats.js.errors.Error as exc:
            if attempt == REPLACE_ATTEMPTS:
                raise
            log.info("consumer %s on %s: replacing it raced another process (%s); looking again", name, stream, exc)
        await asyncio.sleep(0.1 * attempt)
        current = await _consumer_or_none(js, stream, name)
        if current is not None and current.config.deliver_subject is not None:
            return  # another process of the role replaced it


async def _consumer_or_none(js: JetStreamContext, stream: str, name: str) -> Any:
    """The consumer's info, or None when there is no consumer of that name."""
    try:
        return await js.consumer_info(stream, name)
    except nats.js.errors.NotFoundError:
        return None


STREAM_ALREADY_IN_USE = 10058

# what FastStream passes up from nats-py when a connection, a request or a server fails
CONNECT_ERRORS = (OSError, nats.errors.Error, asyncio.TimeoutError)
NO_RESPONDERS = nats.errors.NoRespondersError
TIMEOUTS = (nats.errors.TimeoutError, asyncio.TimeoutError, TimeoutError)
NOT_CONNECTED = (nats.errors.ConnectionClosedError, nats.errors.ConnectionReconnectingError)


async def declare_streams(broker: NatsBroker, replicas: int, limits: streams.StreamLimits | None, *, timeout: float) -> None:
    """Create the streams, or bring an existing one to this configuration."""
    js = jetstream(broker, timeout)
    for base in streams.ALL_STREAMS:
        config = (limits or streams.StreamLimits()).apply(dataclasses.replace(base, num_replicas=replicas))
        try:
            await js.add_stream(config)
        except nats.js.errors.BadRequestError as exc:
            if exc.err_code != STREAM_ALREADY_IN_USE:
                raise
            log.info("updating stream %s to the current configuration", config.name)
            await js.update_stream(config)


def jetstream_not_ready(exc: BaseException) -> str | None:
    """Why JetStream could not do a request for now, when `exc` says so (a starting cluster
    electing its leader, a lost node's streams and consumers moving to the others, an
    answer that did not come in time); None for any other error."""
    if isinstance(exc, (nats.js.errors.ServiceUnavailableError, nats.js.errors.NoStreamResponseError, *TIMEOUTS)):
        return str(exc) or type(exc).__name__
    if isinstance(exc, nats.js.errors.APIError) and exc.err_code in JETSTREAM_NOT_READY:
        return str(exc)
    return None


async def stored_message(broker: NatsBroker, stream: str, sequence: int, *, timeout: float = 5.0) -> RawStreamMsg:
    return await jetstream(broker, timeout).get_msg(stream, sequence)


async def server_time_of(broker: NatsBroker, stream: str, sequence: int) -> datetime | None:
    """The server's timestamp on a stored message."""
    return (await stored_message(broker, stream, sequence)).time


# --- last messages ---------------------------------------------------------------------------


@dataclass
class LastMessage:
    sequence: int
    data: bytes


async def last_message(broker: NatsBroker, stream: str, subject: str, *, timeout: float = 5.0) -> LastMessage | None:
    try:
        raw = await jetstream(broker, timeout).get_last_msg(stream, subject)
    except nats.js.errors.NotFoundError:
        return None
    return LastMessage(sequence=raw.seq or 0, data=raw.data or b"")


async def last_per_subject(
    broker: NatsBroker, stream: str, filter_subject: str, consumer_name: str, *, timeout: float = 10.0
) -> list[Msg]:
    """The last message of every subject under `filter_subject`, read through a consumer of
    this name (a leftover of a crashed run is replaced, and it is deleted afterwards)."""
    js = jetstream(broker, timeout)
    with contextlib.suppress(nats.js.errors.NotFoundError):
        await js.delete_consumer(stream, consumer_name)
    await js.add_consumer(
        stream,
        ConsumerConfig(
            name=consumer_name,
            filter_subject=filter_subject,
            deliver_policy=DeliverPolicy.LAST_PER_SUBJECT,
            ack_policy=JsAckPolicy.NONE,
            inactive_threshold=60,
        ),
    )
    psub = await js.pull_subscribe_bind(consumer_name, stream=stream)
    found: list[Msg] = []
    try:
        remaining = (await psub.consumer_info()).num_pending
        while remaining > 0:
            msgs = await psub.fetch(min(remaining, 512), timeout=timeout)
            found.extend(msgs)
            remaining = msgs[-1].metadata.num_pending
    finally:
        with contextlib.suppress(Exception):
            await psub.unsubscribe()
        with contextlib.suppress(Exception):
            await js.delete_consumer(stream, consumer_name)
    return found


# --- ordered consumers -------------------------------------------------------------------------


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


async def ordered_subscribe(
    broker: NatsBroker,
    subject: str,
    stream: str,
    deliver_policy: DeliverPolicy,
    cb: Callable[[Msg], Awaitable[None]] | None = None,
    *,
    timeout: float = 5.0,
    **config: Any,
) -> Any:
    """An ordered (ephemeral) consumer of `stream` for this process alone; its messages
    keep the server's timestamps and stream sequences."""
    base = ConsumerConfig(deliver_policy=deliver_policy, **config)
    named = _FreshlyNamed(**{f.name: getattr(base, f.name) for f in dataclasses.fields(ConsumerConfig)})
    return await jetstream(broker, timeout).subscribe(subject, stream=stream, ordered_consumer=True, config=named, cb=cb)
