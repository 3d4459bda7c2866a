"""The core process: RPC handlers over NATS, the outbox relay and housekeeping."""
from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable

from faststream.nats import NatsRouter

from core_service import VERSION, metrics
from core_service.admin import Admin
from core_service.context import CoreContext
from core_service.dataplane import DataPlane
from core_service.db import Database
from core_service.enrollment import Enrollments
from core_service.keys import Vault, load_master_key
from core_service.mailer import SmtpMailer
from core_service.mfa import Mfa
from core_service.oidc import OidcAdmin, RelyingParty
from core_service.outbox import OutboxRelay
from core_service.settings import CoreSettings
from events import permissions, streams, subjects
from events.bus import Bus
from events.peer_log import PeerLog
from runtime.clock import Clock, SystemClock
from runtime.metrics import serving_metrics
from runtime.service import cancel_all, every, run_until_signalled
from runtime.settings import load_settings
from schemas import rpc

log = logging.getLogger("core_service")

HOUSEKEEPING_INTERVAL_S = 30
STOP_STEP_TIMEOUT_S = 10.0


class Core:
    """The wiring of one core process; tests run it in-process too."""

    def __init__(self, settings: CoreSettings, *, clock: Clock | None = None) -> None:
        self.settings = settings
        self.clock = clock or SystemClock()
        self.db = Database(
            settings.resolved_database_url(), pool_size=settings.database_pool_size, sqlite_inline=settings.sqlite_inline
        )
        secret = settings.secret_key.get_secret_value() if settings.secret_key else None
        self.vault = Vault(load_master_key(secret, settings.state_dir))
        self.bus: Bus | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._relay: OutboxRelay | None = None

    async def start(self) -> None:
        if self.settings.auto_migrate:
            await self.db.migrate()
        self.bus = await Bus.connect_as(self.settings, permissions.CORE, "core", registry=metrics.registry)
        await self.bus.ensure_streams(self.settings.stream_replicas, limits=self.settings.stream_limits())
        routers = self.build(self.bus)
        assert self._relay is not None
        await self._relay.flush()  # what a previous run committed but could not publish
        await self.bus.serve(*routers)
        self._tasks = [
            asyncio.create_task(self._relay.run(self.settings.outbox_interval_s), name="outbox"),
            asyncio.create_task(every(HOUSEKEEPING_INTERVAL_S, self._housekeeping, "housekeeping", log)),
        ]
        log.info("core ready (version %s, database %s)", VERSION, self.db.sync_engine.url.render_as_string(hide_password=True))

    def build(self, bus: Bus) -> list[NatsRouter]:
        """The core's services over this bus, and the routers of every RPC endpoint and
        stream consumer (the AsyncAPI document is made from them too)."""
        self.peers = PeerLog(bus, signing_key=self.vault.peer_signer.public_key)
        relay = self._relay = OutboxRelay(self.db, bus, self.peers, self.clock)
        ctx = CoreContext(settings=self.settings, db=self.db, vault=self.vault, clock=self.clock, relay=relay)
        mailer = SmtpMailer(self.settings) if self.settings.smtp_host else None
        admin = self.admin = Admin(ctx)
        mfa = self.mfa = Mfa(ctx, mailer)
        enroll = self.enrollments = Enrollments(ctx, mailer)
        self.oidc_admin = OidcAdmin(ctx, RelyingParty(ctx))
        dataplane = self.dataplane = DataPlane(ctx, self.peers)
        endpoints = bus.rpc_router()
        endpoints.endpoint(subjects.RPC_CORE_HELLO, self._hello)
        endpoints.endpoint(subjects.RPC_MFA_START, mfa.start)
        endpoints.endpoint(subjects.RPC_MFA_FINISH, mfa.finish)
        endpoints.endpoint(subjects.RPC_MFA_FINISH_REMOTE, mfa.finish_remote)
        endpoints.endpoint(subjects.RPC_MFA_TOKEN_STATUS, mfa.token_status)
        endpoints.endpoint(subjects.RPC_ENROLL_MOBILE, enroll.register_mobile)
        endpoints.endpoint(subjects.RPC_ENROLL_START, enroll.start)
        endpoints.endpoint(subjects.RPC_ENROLL_FACTOR_START, enroll.factor_start)
        endpoints.endpoint(subjects.RPC_ENROLL_FACTOR_FINISH, enroll.factor_finish)
        endpoints.endpoint(subjects.RPC_ENROLL_ACTIVATE, enroll.activate)
        endpoints.endpoint(subjects.RPC_ENROLL_CREATE_DEVICE, enroll.create_device)
        endpoints.endpoint(subjects.RPC_ENROLL_NETWORK_INFO, enroll.network_info)
        endpoints.endpoint(subjects.RPC_ENROLL_POLL, enroll.poll)
        endpoints.endpoint(subjects.admin_rpc("enroll_create"), enroll.create)
        endpoints.endpoint(subjects.admin_rpc("enroll_list"), enroll.list)
        endpoints.endpoint(subjects.admin_rpc("enroll_revoke"), enroll.revoke)
        endpoints.endpoint(subjects.RPC_OIDC_AUTH_URL, mfa.oidc.auth_url)
        endpoints.endpoint(subjects.RPC_OIDC_CALLBACK, mfa.oidc.callback)
        endpoints.endpoint(subjects.admin_rpc("oidc_set"), self.oidc_admin.set)
        endpoints.endpoint(subjects.admin_rpc("oidc_show"), self._oidc_show)
        endpoints.endpoint(subjects.admin_rpc("oidc_unlink"), admin.oidc_unlink)
        endpoints.endpoint(subjects.admin_rpc("location_add"), admin.location_add)
        endpoints.endpoint(subjects.admin_rpc("location_list"), self._location_list)
        endpoints.endpoint(subjects.admin_rpc("gateway_credentials"), admin.gateway_credentials)
        endpoints.endpoint(subjects.admin_rpc("user_add"), admin.user_add)
        endpoints.endpoint(subjects.admin_rpc("user_list"), self._user_list)
        endpoints.endpoint(subjects.admin_rpc("totp_enroll"), admin.totp_enroll)
        endpoints.endpoint(subjects.admin_rpc("totp_confirm"), admin.totp_confirm)
        endpoints.endpoint(subjects.admin_rpc("email_mfa"), admin.email_mfa)
        endpoints.endpoint(subjects.admin_rpc("mobile_allow"), admin.mobile_allow)
        endpoints.endpoint(subjects.admin_rpc("device_add"), admin.device_add)
        endpoints.endpoint(subjects.admin_rpc("device_list"), admin.device_list)
        endpoints.endpoint(subjects.admin_rpc("sessions"), admin.sessions)
        endpoints.endpoint(subjects.admin_rpc("revoke"), admin.revoke)
        endpoints.endpoint(subjects.admin_rpc("location_set"), admin.location_set)
        endpoints.endpoint(subjects.admin_rpc("location_remove"), admin.location_remove)
        endpoints.endpoint(subjects.admin_rpc("user_disable"), admin.user_disable)
        endpoints.endpoint(subjects.admin_rpc("user_enable"), admin.user_enable)
        endpoints.endpoint(subjects.admin_rpc("user_delete"), admin.user_delete)
        endpoints.endpoint(subjects.admin_rpc("user_unlock"), admin.user_unlock)
        endpoints.endpoint(subjects.admin_rpc("user_set"), admin.user_set)
        endpoints.endpoint(subjects.admin_rpc("user_show"), admin.user_show)
        endpoints.endpoint(subjects.admin_rpc("totp_reset"), admin.totp_reset)
        endpoints.endpoint(subjects.admin_rpc("mobile_remove"), admin.mobile_remove)
        endpoints.endpoint(subjects.admin_rpc("device_remove"), admin.device_remove)
        endpoints.endpoint(subjects.admin_rpc("device_rename"), admin.device_rename)
        # one durable each, shared by every core: the work is split between them
        stream = bus.stream_router()
        stream.consumer(dataplane.on_peer_state, stream=streams.PEERS.name, durable="core-peers",
                        filter_subject=subjects.PEER_ALL)
        stream.consumer(dataplane.on_sample, stream=streams.STATS.name, durable="core-stats",
                        filter_subject=subjects.STATS_ALL)
        return [endpoints, stream]

    async def _location_list(self, request: rpc.Empty) -> rpc.LocationListResult:
        return await self.admin.location_list()

    async def _user_list(self, request: rpc.Empty) -> rpc.UserListResult:
        return await self.admin.user_list()

    async def _oidc_show(self, request: rpc.Empty) -> rpc.OidcProviderInfo:
        return await self.oidc_admin.show()

    async def _hello(self, request: rpc.CoreHello) -> rpc.CoreHelloResult:
        return rpc.CoreHelloResult(rpc_public_key=self.vault.rpc_public_key, version=VERSION, instance_id=self.vault.instance_id)

    async def _housekeeping(self) -> None:
        expired = await self.mfa.expire_logins()
        if expired:
            log.info("expired %s MFA logins", expired)
        closed = await self.enrollments.expire()
        if closed:
            log.info("closed %s enrollment sessions", closed)
        await self.dataplane.purge_stats()

    async def stop(self) -> None:
        await cancel_all(self._tasks)
        # Each step bounded: what the outbox could not mark is published again (same
        # message id, deduplicated) by the next core, so a stop never has to wait for ever.
        if self._relay is not None:
            await self._bounded(self._relay.mark_published(), "marking the published outbox rows")
        if self.bus is not None:
            await self._bounded(self.bus.close(), "closing the NATS connection")
        await self._bounded(self.db.close(), "closing the database")

    @staticmethod
    async def _bounded(step: Awaitable[None], what: str) -> None:
        try:
            await asyncio.wait_for(step, STOP_STEP_TIMEOUT_S)
        except asyncio.TimeoutError:
            log.warning("stopping: %s took longer than %g s; going on", what, STOP_STEP_TIMEOUT_S)
        except Exception as exc:
            log.warning("stopping: %s failed: %s", what, exc)


async def main() -> None:
    settings = load_settings(CoreSettings)
    core = Core(settings)
    async with serving_metrics(metrics.registry, settings.metrics_host, settings.core_metrics_port,
                               before_scrape=lambda: metrics.LIVE_SESSIONS.refresh(core.db)):
        await run_until_signalled("core", settings, core)
