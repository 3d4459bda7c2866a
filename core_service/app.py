"""The core process: RPC handlers over NATS, the outbox relay and housekeeping."""
from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable

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
from runtime.clock import Clock, SystemClock
from runtime.metrics import serving_metrics
from runtime.service import cancel_all, every, run_until_signalled
from runtime.settings import load_settings
from schemas import rpc
from schemas.events import PEER_STATE_ADAPTER, STATS_ADAPTER

log = logging.getLogger("core_service")

HOUSEKEEPING_INTERVAL_S = 30
STOP_STEP_TIMEOUT_S = 10.0


class Core:
    """The wiring of one core process; tests run it in-process too."""

    def __init__(self, settings: CoreSettings, *, clock: Clock | None = None) -> None:
        self.settings = settings
        self.clock = clock or SystemClock()
        self.db = Database(settings.resolved_database_url(), sqlite_inline=settings.sqlite_inline)
        secret = settings.secret_key.get_secret_value() if settings.secret_key else None
        self.vault = Vault(load_master_key(secret, settings.state_dir))
        self.bus: Bus | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._relay: OutboxRelay | None = None

    async def start(self) -> None:
        if self.settings.auto_migrate:
            await self.db.migrate()
        self.bus = await Bus.connect_as(self.settings, permissions.CORE, "core")
        self.bus.peer_signing_key = self.vault.peer_signer.public_key
        await self.bus.ensure_streams(self.settings.stream_replicas, limits=self.settings.stream_limits())
        relay = self._relay = OutboxRelay(self.db, self.bus, self.clock)
        ctx = CoreContext(settings=self.settings, db=self.db, vault=self.vault, clock=self.clock, relay=relay)
        mailer = SmtpMailer(self.settings) if self.settings.smtp_host else None
        self.mfa = Mfa(ctx, mailer)
        self.admin = Admin(ctx)
        self.enrollments = Enrollments(ctx, mailer)
        self.oidc_admin = OidcAdmin(ctx, RelyingParty(ctx))
        await relay.flush()  # what a previous run committed but could not publish
        for subject, request_type, handler in self._routes():
            await self.bus.serve_rpc(subject, request_type, handler)
        dataplane = self.dataplane = DataPlane(ctx)
        # one durable each, shared by every core: the work is split between them
        self.bus.consume(
            stream=streams.PEERS.name,
            durable="core-peers",
            filter_subject=subjects.PEER_ALL,
            decode=PEER_STATE_ADAPTER.validate_json,
            handler=lambda state, _msg: dataplane.on_peer_state(state),
        )
        self.bus.consume(
            stream=streams.STATS.name,
            durable="core-stats",
            filter_subject=subjects.STATS_ALL,
            decode=STATS_ADAPTER.validate_json,
            handler=lambda sample, _msg: dataplane.on_sample(sample),
        )
        self._tasks = [
            asyncio.create_task(relay.run(self.settings.outbox_interval_s), name="outbox"),
            asyncio.create_task(every(HOUSEKEEPING_INTERVAL_S, self._housekeeping, "housekeeping", log)),
        ]
        log.info("core ready (version %s, database %s)", VERSION, self.db.engine.url.render_as_string(hide_password=True))

    def _routes(self) -> list[tuple[str, type, object]]:
        admin, mfa, enroll = self.admin, self.mfa, self.enrollments
        return [
            (subjects.RPC_CORE_HELLO, rpc.CoreHello, self._hello),
            (subjects.RPC_MFA_START, rpc.MfaStartRequest, mfa.start),
            (subjects.RPC_MFA_FINISH, rpc.MfaFinishRequest, mfa.finish),
            (subjects.RPC_MFA_FINISH_REMOTE, rpc.MfaFinishRemoteRequest, mfa.finish_remote),
            (subjects.RPC_MFA_TOKEN_STATUS, rpc.TokenStatusRequest, mfa.token_status),
            (subjects.RPC_ENROLL_MOBILE, rpc.RegisterMobileRequest, enroll.register_mobile),
            (subjects.RPC_ENROLL_START, rpc.EnrollStartRequest, enroll.start),
            (subjects.RPC_ENROLL_FACTOR_START, rpc.EnrollFactorStartRequest, enroll.factor_start),
            (subjects.RPC_ENROLL_FACTOR_FINISH, rpc.EnrollFactorFinishRequest, enroll.factor_finish),
            (subjects.RPC_ENROLL_ACTIVATE, rpc.EnrollSession, enroll.activate),
            (subjects.RPC_ENROLL_CREATE_DEVICE, rpc.EnrollCreateDeviceRequest, enroll.create_device),
            (subjects.RPC_ENROLL_NETWORK_INFO, rpc.EnrollNetworkInfoRequest, enroll.network_info),
            (subjects.RPC_ENROLL_POLL, rpc.PollRequest, enroll.poll),
            (subjects.admin_rpc("enroll_create"), rpc.EnrollCreateRequest, enroll.create),
            (subjects.admin_rpc("enroll_list"), rpc.EnrollListRequest, enroll.list),
            (subjects.admin_rpc("enroll_revoke"), rpc.EnrollRevokeRequest, enroll.revoke),
            (subjects.RPC_OIDC_AUTH_URL, rpc.OidcAuthUrlRequest, mfa.oidc.auth_url),
            (subjects.RPC_OIDC_CALLBACK, rpc.OidcCallbackRequest, mfa.oidc.callback),
            (subjects.admin_rpc("oidc_set"), rpc.OidcProviderSetRequest, self.oidc_admin.set),
            (subjects.admin_rpc("oidc_show"), rpc.Empty, lambda _req: self.oidc_admin.show()),
            (subjects.admin_rpc("oidc_unlink"), rpc.UserChangeRequest, admin.oidc_unlink),
            (subjects.admin_rpc("location_add"), rpc.LocationAddRequest, admin.location_add),
            (subjects.admin_rpc("location_list"), rpc.Empty, lambda _req: admin.location_list()),
            (subjects.admin_rpc("gateway_credentials"), rpc.GatewayCredentialsRequest, admin.gateway_credentials),
            (subjects.admin_rpc("user_add"), rpc.UserAddRequest, admin.user_add),
            (subjects.admin_rpc("user_list"), rpc.Empty, lambda _req: admin.user_list()),
            (subjects.admin_rpc("totp_enroll"), rpc.TotpEnrollRequest, admin.totp_enroll),
            (subjects.admin_rpc("totp_confirm"), rpc.TotpConfirmRequest, admin.totp_confirm),
            (subjects.admin_rpc("email_mfa"), rpc.EmailMfaRequest, admin.email_mfa),
            (subjects.admin_rpc("mobile_allow"), rpc.MobileAllowRequest, admin.mobile_allow),
            (subjects.admin_rpc("device_add"), rpc.DeviceAddRequest, admin.device_add),
            (subjects.admin_rpc("device_list"), rpc.DeviceListRequest, admin.device_list),
            (subjects.admin_rpc("sessions"), rpc.SessionsRequest, admin.sessions),
            (subjects.admin_rpc("revoke"), rpc.RevokeRequest, admin.revoke),
            (subjects.admin_rpc("location_set"), rpc.LocationSetRequest, admin.location_set),
            (subjects.admin_rpc("location_remove"), rpc.LocationRemoveRequest, admin.location_remove),
            (subjects.admin_rpc("user_disable"), rpc.UserChangeRequest, admin.user_disable),
            (subjects.admin_rpc("user_enable"), rpc.UserChangeRequest, admin.user_enable),
            (subjects.admin_rpc("user_delete"), rpc.UserChangeRequest, admin.user_delete),
            (subjects.admin_rpc("user_unlock"), rpc.UserChangeRequest, admin.user_unlock),
            (subjects.admin_rpc("user_set"), rpc.UserSetRequest, admin.user_set),
            (subjects.admin_rpc("user_show"), rpc.UserRef, admin.user_show),
            (subjects.admin_rpc("totp_reset"), rpc.FactorRemoveRequest, admin.totp_reset),
            (subjects.admin_rpc("mobile_remove"), rpc.MobileRemoveRequest, admin.mobile_remove),
            (subjects.admin_rpc("device_remove"), rpc.DeviceRef, admin.device_remove),
            (subjects.admin_rpc("device_rename"), rpc.DeviceRenameRequest, admin.device_rename),
        ]

    async def _hello(self, _req: rpc.CoreHello) -> rpc.CoreHelloResult:
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
