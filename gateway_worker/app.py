"""The gateway process: one location, one WireGuard interface.

Start: ensure the interface, read the last message of every peer subject of the location,
diff the interface against it, announce `gateway.synced`, then follow the stream with its
own durable consumer. Every `WGMFA_STATS_INTERVAL` it publishes a handshake sample.
"""
from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import time
from dataclasses import dataclass
from datetime import datetime, timezone

from faststream.nats import DeliverPolicy, NatsRouter
from pydantic import ValidationError

from events import nats_direct, permissions, streams, subjects
from events.bus import Bus, PermanentFailure
from events.outcomes import delivery_attempt, describe_validation_error
from runtime.clock import Clock, SystemClock
from runtime.service import cancel_all, every
from gateway_worker import metrics
from schemas import signing
from schemas.sealing import SealError, unseal
from wireguard.port import BackendError, InterfaceConfig, PeerConfig, WireGuardBackend
from gateway_worker.settings import GatewaySettings, default_gateway_id
from gateway_worker.sync import plan
from schemas.common import uuid7
from schemas.events import (
    PEER_STATE_ADAPTER,
    GatewayApplyFailed,
    GatewaySynced,
    PeerAuthorized,
    PeerRevoked,
    PeerSample,
    StatsSample,
    peer_state_order,
)
from schemas.rpc import GatewayCredentials

log = logging.getLogger("gateway_worker")

PEERS_PER_SAMPLE = 1000  # keeps a sample message well under NATS's 1 MiB payload limit


@dataclass
class Applied:
    order: tuple[int, int]
    pubkey: str


class Gateway:
    def __init__(
        self,
        settings: GatewaySettings,
        credentials: GatewayCredentials,
        backend: WireGuardBackend,
        *,
        clock: Clock | None = None,
        bus: Bus | None = None,
    ) -> None:
        self.settings = settings
        self.credentials = credentials
        self.backend = backend
        self.clock = clock or SystemClock()
        self.bus = bus
        self._own_bus = bus is None
        self.location_id = credentials.location_id
        self.gateway_id = settings.gateway_id or default_gateway_id()
        self.interface = InterfaceConfig(
            name=settings.interface or f"wgmfa{credentials.location_id}",
            private_key=credentials.private_key,
            listen_port=credentials.listen_port,
            address=credentials.address,
            netns=settings.netns,
        )
        self.applied: dict[int, Applied] = {}  # device id -> the newest state applied
        # device id -> the last authorization that passed `check` and its opened peer: a
        # resync meets the same message again for every healthy peer, and checking its
        # signature and opening its PSK again is most of a resync's time
        self._accepted: dict[int, tuple[PeerAuthorized, PeerConfig]] = {}
        # One writer to the interface at a time, and the generation comparison made under
        # the same hold as the write it allows: two states of one device compared first and
        # applied afterwards could apply in the wrong order (an authorize after the revoke
        # of its generation, leaving a revoked peer installed).
        self._lock = asyncio.Lock()
        self._tasks: list[asyncio.Task[None]] = []
        self._routers: list[NatsRouter] = []
        self.synced = asyncio.Event()

    @property
    def role(self) -> str:
        """Its NATS role: this location's peers only, its own consumers and stats subject."""
        return permissions.gateway_role_name(self.location_id, self.gateway_id)

    @property
    def durable(self) -> str:
        return permissions.gateway_durable(self.location_id, self.gateway_id)

    async def start(self) -> None:
        if self.bus is None:
            self.bus = await Bus.connect_as(self.settings, self.role, f"gateway {self.gateway_id}",
                                            registry=metrics.registry)
        await self.bus.wait_for_streams(streams.PEERS.name)
        await self.backend.ensure_interface(self.interface)
        await self.resync()
        self._routers = self.build(self.bus)
        await self.bus.serve(*self._routers)
        self._tasks.append(
            asyncio.create_task(every(self.settings.stats_interval, self.publish_stats, "stats", log), name="gateway stats")
        )
        log.info(
            "gateway %s ready: location %s on %s (%s)",
            self.gateway_id, self.location_id, self.interface.name, type(self.backend).__name__,
        )

    def build(self, bus: Bus) -> list[NatsRouter]:
        """The gateway's stream consumer over this bus (the AsyncAPI document is made from it too)."""
        router = bus.stream_router(max_deliver=0)  # a valid state is retried until the interface takes it
        router.consumer(
            self.on_peer_state,
            stream=streams.PEERS.name,
            durable=self.durable,
            filter_subject=subjects.peers_of_location(self.location_id),
            deliver_policy=DeliverPolicy.LAST_PER_SUBJECT,
            title=subjects.PEERS_OF_LOCATION_TEMPLATE,
        )
        return [router]

    # --- the stream's view ------------------------------------------------------------------

    async def snapshot(self) -> dict[int, PeerAuthorized | PeerRevoked]:
        """The last state of every device of the location, read from the stream alone."""
        assert self.bus is not None
        # A consumer with a name of its own: the gateway's permissions allow exactly this
        # one, filtered to its location.
        msgs = await nats_direct.last_per_subject(
            self.bus.broker,
            streams.PEERS.name,
            subjects.peers_of_location(self.location_id),
            permissions.gateway_snapshot_consumer(self.location_id, self.gateway_id),
        )
        states: dict[int, PeerAuthorized | PeerRevoked] = {}
        for msg in msgs:
            try:
                state = PEER_STATE_ADAPTER.validate_json(msg.data)
            except ValidationError as exc:
                await self.bus.dead_letter(msg.subject, msg.data, msg.headers,
                                           f"undecodable: {describe_validation_error(exc)}")
                continue
            states[state.device_id] = state
        return states

    def _psk(self, state: PeerAuthorized) -> str | None:
        if state.psk_sealed is None:
            return None
        try:
            return unseal(self.credentials.sealing_private_key, state.psk_sealed).decode()
        except SealError as exc:
            raise PermanentFailure(f"cannot open the PSK of device {state.device_id}: {exc} (wrong credentials?)") from None

    def check(self, state: PeerAuthorized) -> None:
        """Refuse (PermanentFailure, with the reason) an authorization the core did not
        sign, or one this location must not take whoever signed it."""
        if state.location_id != self.location_id:
            raise PermanentFailure(f"an authorization for location {state.location_id} on this location's subject")
        try:
            signing.verify(state, self.credentials.core_signing_key)
        except signing.SignatureInvalid as exc:
            raise PermanentFailure(f"refused: {exc}") from None
        network = ipaddress.ip_network(self.credentials.network, strict=False)
        for allowed in state.allowed_ips:
            try:
                inside = ipaddress.ip_network(allowed, strict=False).subnet_of(network)  # type: ignore[arg-type]
            except (ValueError, TypeError):
                inside = False
            if not inside:
                raise PermanentFailure(f"refused: allowed IP {allowed} is outside the location's network {network}")
        if self.credentials.mfa_required and state.psk_sealed is None:
            raise PermanentFailure("refused: no PSK at an MFA location")
        if self.credentials.mfa_required and state.threshold_s is None:
            raise PermanentFailure("refused: no disconnect threshold at an MFA location")

    def _peer(self, state: PeerAuthorized) -> PeerConfig:
        accepted = self._accepted.get(state.device_id)
        if accepted is not None and accepted[0] == state:  # every field equal, the signature included
            return accepted[1]
        self.check(state)
        peer = PeerConfig(public_key=state.pubkey, preshared_key=self._psk(state), allowed_ips=tuple(state.allowed_ips))
        self._accepted[state.device_id] = (state, peer)
        return peer

    # --- resync ---------------------------------------------------------------------------

    async def resync(self) -> GatewaySynced:
        """Make the interface match the stream: add missing peers, remove extra ones, fix
        changed ones, and leave correct ones untouched."""
        assert self.bus is not None
        began = time.perf_counter()
        # The snapshot is read under the lock too: a state the stream consumer applies
        # meanwhile is either in it or comes after it, never undone by it.
        async with self._lock:
            states = await self.snapshot()
            desired: dict[str, PeerConfig] = {}
            refused: dict[int, PeerAuthorized] = {}
            for state in states.values():
                if isinstance(state, PeerAuthorized):
                    try:
                        desired[state.pubkey] = self._peer(state)
                    except PermanentFailure as exc:
                        refused[state.device_id] = state
                        await self._apply_failed(state, "sync", str(exc), 1)
                        await self.bus.dead_letter(subjects.peer(self.location_id, state.device_id),
                                                   state.model_dump_json().encode(), None, str(exc))
            status = await self.backend.status()
            # A refused last state hides the device's true one (the stream keeps one
            # message per subject), so a resync fails closed: the device gets no peer
            # until the core authorizes it again. Keeping what the interface has would let
            # a forgery over a revoke keep a revoked peer alive.
            todo = plan(desired, status.peers)
            applying = time.perf_counter()
            await self.backend.apply(todo.add + todo.update, todo.remove)
            metrics.APPLY_SECONDS.labels("sync").observe(time.perf_counter() - applying)
            self.applied = {
                device: Applied(peer_state_order(state), state.pubkey)
                for device, state in states.items()
                if device not in refused
            }
            self._accepted = {device: accepted for device, accepted in self._accepted.items()
                              if isinstance(states.get(device), PeerAuthorized) and device not in refused}
        event = GatewaySynced(
            location_id=self.location_id,
            gateway_id=self.gateway_id,
            interface=self.interface.name,
            peers=len(desired),
            added=len(todo.add),
            removed=len(todo.remove),
            updated=len(todo.update),
            unchanged=len(todo.unchanged),
            duration_ms=round((time.perf_counter() - began) * 1000, 1),
        )
        await self.bus.publish_event(event)
        log.info(
            "synced %s: %s peers (%s added, %s removed, %s updated, %s unchanged) in %.0f ms",
            self.interface.name, event.peers, event.added, event.removed, event.updated, event.unchanged,
            event.duration_ms,
        )
        self.synced.set()
        return event

    # --- following the stream ---------------------------------------------------------------

    async def on_peer_state(self, state: PeerAuthorized | PeerRevoked) -> None:
        """The stream consumer: a refusal raises PermanentFailure (dead-lettered at once), a
        failed write BackendError (redelivered with a growing delay, never acked before it holds)."""
        await self.apply(state, attempt=delivery_attempt())

    async def apply(self, state: PeerAuthorized | PeerRevoked, *, attempt: int = 1) -> None:
        """Put one device's state on the interface unless a newer one is there already."""
        action = "authorize" if isinstance(state, PeerAuthorized) else "revoke"
        if state.location_id != self.location_id:
            reason = f"a state for location {state.location_id} on this location's subject"
            await self._apply_failed(state, action, reason, attempt)
            raise PermanentFailure(reason)
        try:
            async with self._lock:
                current = self.applied.get(state.device_id)
                if current is not None and peer_state_order(state) <= current.order:
                    return  # stale or already applied (a resync or a newer state got there first)
                applying = time.perf_counter()
                if isinstance(state, PeerAuthorized):
                    await self.backend.set_peer(self._peer(state))
                else:
                    await self.backend.remove_peer(state.pubkey)
                    self._accepted.pop(state.device_id, None)
                metrics.APPLY_SECONDS.labels(action).observe(time.perf_counter() - applying)
                self.applied[state.device_id] = Applied(peer_state_order(state), state.pubkey)
        except (PermanentFailure, BackendError) as exc:
            await self._apply_failed(state, action, str(exc), attempt)
            raise
        log.info("%s device %s generation %s", "applied" if action == "authorize" else "removed",
                 state.device_id, state.generation)

    async def _apply_failed(self, state: PeerAuthorized | PeerRevoked | None, action: str, reason: str, attempt: int) -> None:
        assert self.bus is not None
        log.warning("%s failed (attempt %s): %s", action, attempt, reason)
        metrics.APPLY_FAILURES.labels(action).inc()
        with contextlib.suppress(Exception):
            await self.bus.publish_event(
                GatewayApplyFailed(
                    location_id=self.location_id,
                    gateway_id=self.gateway_id,
                    device_id=state.device_id if state else None,
                    generation=state.generation if state else None,
                    action=action,  # type: ignore[arg-type]
                    reason=reason[:500],
                    attempt=attempt,
                )
            )

    # --- statistics ---------------------------------------------------------------------------

    async def publish_stats(self) -> StatsSample | None:
        """Read the interface once and publish it; recreate and resync a lost interface."""
        assert self.bus is not None
        try:
            status = await self.backend.status()
        except BackendError as exc:
            await self._apply_failed(None, "sync", f"interface lost: {exc}", 1)
            await self.recover()
            return None
        sampled_at = self.clock.now()
        peers = [
            PeerSample(
                pubkey=p.public_key,
                latest_handshake=datetime.fromtimestamp(p.latest_handshake, timezone.utc) if p.latest_handshake else None,
                rx_bytes=p.rx_bytes,
                tx_bytes=p.tx_bytes,
                endpoint=p.endpoint,
            )
            for p in status.peers
        ]
        chunks = [peers[i : i + PEERS_PER_SAMPLE] for i in range(0, len(peers), PEERS_PER_SAMPLE)] or [[]]
        sample_id = uuid7()
        last = None
        for part, chunk in enumerate(chunks, start=1):
            last = StatsSample(
                location_id=self.location_id,
                gateway_id=self.gateway_id,
                sample_id=sample_id,
                sampled_at=sampled_at,
                part=part,
                parts=len(chunks),
                peers=chunk,
                stats_interval_s=self.settings.stats_interval,
            )
            await self.bus.publish(subjects.stats(self.location_id, self.gateway_id), last)
        return last

    async def recover(self) -> None:
        try:
            await self.backend.ensure_interface(self.interface)
            await self.resync()
        except Exception as exc:
            log.error("could not recreate %s: %s", self.interface.name, exc)

    async def stop(self) -> None:
        await cancel_all(self._tasks)
        for router in self._routers:  # the bus may be shared and outlive this gateway
            for subscriber in router.subscribers:
                with contextlib.suppress(Exception):
                    await subscriber.stop()
        if self.bus is not None and self._own_bus:
            await self.bus.close()
        if self.settings.remove_interface_on_exit:
            with contextlib.suppress(Exception):
                await self.backend.remove_interface()
        await self.backend.close()
