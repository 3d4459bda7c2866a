"""Durable stream consumers (events.bus.StreamRouter.consumer): the server pushes their
messages to the role's processes, which share one durable and handle them one at a time,
in order; a pull consumer of the same name, left by an earlier version, is replaced
without handling again what it had acknowledged."""
from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import nats
from nats.js.api import AckPolicy, ConsumerConfig

from core_service.app import Core
from core_service.settings import CoreSettings
from events import permissions, streams, subjects
from events.bus import Bus
from schemas.common import RevokeReason
from schemas.events import MfaStarted, PeerRevoked
from tests.support.stack import SecuredNats, eventually


def revoke(device_id: int) -> PeerRevoked:
    return PeerRevoked(location_id=1, device_id=device_id, generation=1, pubkey=f"k{device_id}", reason=RevokeReason.IDLE)


def core_as_its_role(nats_server: SecuredNats, state_dir: Path) -> Core:
    return Core(CoreSettings(nats_url=nats_server.plain_url, nats_nkey_seed=nats_server.seed(permissions.CORE),
                             state_dir=state_dir))


async def leave_a_pull_core_peers(nats_server: SecuredNats, js: Any, state_dir: Path) -> None:
    """The streams, and `core-peers` as an earlier version left it: a pull consumer."""
    core = core_as_its_role(nats_server, state_dir)
    await core.start()  # declares the streams, makes core-peers a push consumer
    await core.stop()
    await js.delete_consumer(streams.PEERS.name, "core-peers")
    await js.add_consumer(streams.PEERS.name, ConsumerConfig(
        durable_name="core-peers", filter_subject=subjects.PEER_ALL, ack_policy=AckPolicy.EXPLICIT,
    ))


async def test_the_core_replaces_a_pull_consumer_and_goes_on_after_what_it_acknowledged(
    nats_server: SecuredNats, tmp_path: Path
) -> None:
    harness = await nats.connect(nats_server.url)
    js = harness.jetstream()
    core = core_as_its_role(nats_server, tmp_path)
    try:
        # what an earlier version left: core-peers as a pull consumer, two of three states acknowledged
        await leave_a_pull_core_peers(nats_server, js, tmp_path)
        for device_id in (1, 2, 3):
            await js.publish(subjects.peer(1, device_id), revoke(device_id).model_dump_json().encode())
        pull = await js.pull_subscribe_bind("core-peers", stream=streams.PEERS.name)
        for message in await pull.fetch(2, timeout=5):
            await message.ack_sync()
        await pull.unsubscribe()

        core = core_as_its_role(nats_server, tmp_path)
        await core.start()  # as its own role: may delete and create its durable, nothing more

        async def replaced_and_caught_up() -> bool:
            info = await js.consumer_info(streams.PEERS.name, "core-peers")
            return info.config.deliver_subject is not None and info.ack_floor.stream_seq == 3 and info.num_ack_pending == 0

        await eventually(replaced_and_caught_up, timeout=10, what="core-peers pushing and caught up")
        info = await js.consumer_info(streams.PEERS.name, "core-peers")
        assert info.config.deliver_group == "core-peers"
        assert info.config.deliver_subject == f"{permissions.inbox_prefix(permissions.CORE)}.core-peers"
        assert info.delivered.consumer_seq == 1  # the third state only: the first two were not handled again
        assert info.num_redelivered == 0
    finally:
        await core.stop()
        await harness.close()


async def test_processes_of_a_role_starting_together_each_replace_the_pull_consumer_and_are_all_served(
    nats_server: SecuredNats, tmp_path: Path
) -> None:
    harness = await nats.connect(nats_server.url)
    js = harness.jetstream()
    await leave_a_pull_core_peers(nats_server, js, tmp_path)
    handled: dict[str, list[int]] = {"a": [], "b": []}
    buses = [await nats_server.connect(permissions.CORE) for _ in handled]
    try:
        routers = []
        for bus, name in zip(buses, handled):
            router = bus.stream_router()
            router.consumer(revoke_recorder(handled[name]), stream=streams.PEERS.name, durable="core-peers",
                            filter_subject=subjects.PEER_ALL)
            routers.append(router)
        # an upgrade: both find the pull consumer and replace it
        await asyncio.gather(*(bus.serve(router) for bus, router in zip(buses, routers)))
        count = 40
        for device_id in range(1, count + 1):
            await js.publish(subjects.peer(1, device_id), revoke(device_id).model_dump_json().encode())

        async def all_handled() -> bool:
            return len(handled["a"]) + len(handled["b"]) >= count

        await eventually(all_handled, timeout=15, what="every state handled")
        assert sorted(handled["a"] + handled["b"]) == list(range(1, count + 1))
        info = await js.consumer_info(streams.PEERS.name, "core-peers")
        assert info.config.deliver_subject is not None and info.config.deliver_group == "core-peers"
    finally:
        for bus in buses:
            await bus.close()
        await harness.close()


def revoke_recorder(handled: list[int]):  # type: ignore[no-untyped-def]
    async def handle(state: PeerRevoked) -> None:
        handled.append(state.device_id)

    return handle


def recorder(handled: list[int]):  # type: ignore[no-untyped-def]
    async def handle(event: MfaStarted) -> None:
        handled.append(event.location_id)
        await asyncio.sleep(0.001)  # a handler that awaits: the next message still waits for it

    return handle


async def test_processes_of_a_role_share_a_durable_each_message_once_each_in_order(nats_server: SecuredNats) -> None:
    harness = await nats.connect(nats_server.url)
    js = harness.jetstream()
    await js.add_stream(name="T", subjects=["t.>"])
    handled: dict[str, list[int]] = {"a": [], "b": []}
    buses: list[Bus] = []
    try:
        for name in handled:
            bus = await Bus.connect(nats_server.url, f"test-{name}", wait_s=5)
            buses.append(bus)

            router = bus.stream_router()
            router.consumer(recorder(handled[name]), stream="T", durable="shared", filter_subject="t.>")
            await bus.serve(router)
        count = 200
        for i in range(count):
            event = MfaStarted(location_id=i, location_name="l", device_id=1, device_name="d", user_id=1,
                               username="u", login_id=f"00000000-0000-7000-8000-{i:012d}", method="totp",
                               expires_at="2030-01-01T00:00:00Z")
            await js.publish("t.x", event.model_dump_json().encode())

        async def all_handled() -> bool:
            return len(handled["a"]) + len(handled["b"]) >= count

        await eventually(all_handled, timeout=20, what="every message handled")
        await asyncio.sleep(0.2)
        assert sorted(handled["a"] + handled["b"]) == list(range(count))  # each once
        assert handled["a"] and handled["b"]  # by both
        assert all(handled[name] == sorted(handled[name]) for name in handled)  # each process in order
        info = await js.consumer_info("T", "shared")
        assert info.config.deliver_group == "shared" and info.num_ack_pending == 0 and info.num_redelivered == 0
    finally:
        for bus in buses:
            await bus.close()
        await harness.close()
