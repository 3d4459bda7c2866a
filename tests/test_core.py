"""The core's domain over a real bus, on SQLite and on PostgreSQL, with a fake clock."""
from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pyotp
import pytest
import pytest_asyncio
from sqlalchemy import text

from core_service.app import Core
from core_service.mfa import reset_failures
from core_service.settings import CoreSettings
from events import nats_direct
from events.peer_log import PeerLog
from events import subjects
from events.bus import Bus
from runtime.testing import FakeClock
from schemas.sealing import generate_keypair, unseal
from proxy_service.core_client import BusHolder, CoreClient
from schemas import rpc
from schemas.common import uuid7
from schemas.events import PeerAuthorized, PeerRevoked, PeerSample, StatsSample
from schemas.rpc import ErrorStatus, RpcFailure
from tests.support.stack import eventually, read_stream
from wgmfa.admin import AdminClient
from wgmfa.smtp_sink import MailSink


@dataclass
class Harness:
    core: Core
    clock: FakeClock
    bus: Bus
    admin: AdminClient
    client: CoreClient

    def code(self, secret: str, offset_s: int = 0) -> str:
        return pyotp.TOTP(secret).at(self.clock.now() + timedelta(seconds=offset_s))

    async def location(self, name: str = "office", **kw: object) -> tuple[rpc.LocationInfo, dict]:
        result = await self.admin.call(
            "location_add",
            rpc.LocationAddRequest(
                name=name,
                endpoint=kw.pop("endpoint", "192.0.2.1:51820"),  # type: ignore[arg-type]
                network=kw.pop("network", "10.10.0.0/24"),  # type: ignore[arg-type]
                reply_key=self.admin.reply_key.public,
                **kw,
            ),
            rpc.LocationAddResult,
        )

        return result.location, json.loads(self.admin.reply_key.open(result.credentials_sealed))

    async def user(self, username: str = "alice") -> str:
        await self.admin.call("user_add", rpc.UserAddRequest(username=username, email=f"{username}@example.com"), rpc.UserInfo)
        enrolled = await self.admin.call(
            "totp_enroll", rpc.TotpEnrollRequest(username=username, reply_key=self.admin.reply_key.public), rpc.TotpEnrollResult
        )
        secret = pyotp.parse_uri(self.admin.reply_key.open(enrolled.otpauth_uri_sealed)).secret
        await self.admin.call(
            "totp_confirm",
            rpc.TotpConfirmRequest(username=username, code_sealed=await self.admin.seal_for_core(self.code(secret, -30))),
            rpc.UserInfo,
        )
        return secret

    async def device(self, username: str, name: str, location: str) -> rpc.DeviceConfig:
        return await self.admin.call(
            "device_add",
            rpc.DeviceAddRequest(username=username, name=name, location=location, pubkey=generate_keypair()[1]),
            rpc.DeviceConfig,
        )

    async def login(self, location_id: int, pubkey: str, code: str, client: rpc.ClientInfo | None = None) -> str:
        client = client or rpc.ClientInfo(ip="192.0.2.10")
        token, _ = await self.client.start(location_id, pubkey, 0, client)
        psk, _ = await self.client.finish(token, code, None, client)
        return psk

    async def events(self, event_type: str | None = None) -> list[dict]:
        found = await read_stream(self.bus, subjects.EVENTS_ALL)
        return [e for e in found if event_type is None or e["type"] == event_type]

    async def sql(self, query: str) -> list[tuple]:
        async with self.core.db.reader() as session:
            return list((await session.exec(text(query))).all())  # type: ignore[call-overload]


@contextlib.asynccontextmanager
async def running_core(nats_url: str, database_url: str, tmp_path: Path, **settings: object) -> AsyncIterator[Harness]:
    clock = FakeClock(datetime.now(timezone.utc).replace(microsecond=0))
    core = Core(CoreSettings(nats_url=nats_url, database_url=database_url, state_dir=tmp_path, **settings), clock=clock)
    await core.start()
    bus = await Bus.connect(nats_url, "test", wait_s=5)
    holder = BusHolder()
    holder.bus = bus
    try:
        yield Harness(core, clock, bus, AdminClient(bus, 10), CoreClient(holder, 10))
    finally:
        await bus.close()
        await core.stop()


@pytest_asyncio.fixture
async def h(nats_url: str, database_url: str, tmp_path: Path) -> AsyncIterator[Harness]:
    async with running_core(nats_url, database_url, tmp_path) as harness:
        yield harness


async def expect_failure(call, status: ErrorStatus, message: str | None = None) -> RpcFailure:  # type: ignore[no-untyped-def]
    with pytest.raises(RpcFailure) as caught:
        await call
    assert caught.value.error.status == status, caught.value.error
    if message is not None:
        assert caught.value.error.message == message
    return caught.value


async def test_relogin_replaces_the_session_with_a_new_psk_and_generation(h: Harness) -> None:
    location, credentials = await h.location()
    secret = await h.user()
    device = await h.device("alice", "laptop", "office")

    first = await h.login(location.id, device.pubkey, h.code(secret))
    h.clock.advance(30)
    second = await h.login(location.id, device.pubkey, h.code(secret))
    assert first != second
    for psk in (first, second):
        assert len(base64.b64decode(psk, validate=True)) == 32

    state = (await PeerLog(h.bus).last_peer_state(location.id, device.device_id)).state
    assert isinstance(state, PeerAuthorized) and state.generation == 2
    assert unseal(credentials["sealing_private_key"], state.psk_sealed).decode() == second

    sessions = (await h.admin.call("sessions", rpc.SessionsRequest(), rpc.SessionsResult)).sessions
    assert [(s.generation, s.state.value, s.revoke_reason) for s in sessions] == [
        (2, "authorized", None),
        (1, "revoked", "replaced"),
    ]
    revoked = await h.events("session.revoked")
    assert [(e["generation"], e["reason"]) for e in revoked] == [(1, "replaced")]
    # the replaced session's PSK is forgotten
    assert await h.sql("SELECT count(*) FROM vpn_session WHERE psk_enc IS NOT NULL") == [(1,)]


async def test_parallel_finishes_of_one_login_succeed_once(h: Harness) -> None:
    location, _ = await h.location()
    secret = await h.user()
    device = await h.device("alice", "laptop", "office")
    client = rpc.ClientInfo()
    token, _ = await h.client.start(location.id, device.pubkey, 0, client)
    code = h.code(secret)
    results = await asyncio.gather(*(h.client.finish(token, code, None, client) for _ in range(20)), return_exceptions=True)
    successes = [r for r in results if not isinstance(r, Exception)]
    assert len(successes) == 1, results
    assert all(isinstance(r, RpcFailure) for r in results if r not in successes)
    assert await h.sql("SELECT count(*) FROM vpn_session") == [(1,)]


async def test_one_code_on_logins_of_two_devices_succeeds_once(h: Harness) -> None:
    location, _ = await h.location()
    secret = await h.user()
    devices = [await h.device("alice", name, "office") for name in ("laptop", "desktop")]
    client = rpc.ClientInfo()
    tokens = [(await h.client.start(location.id, d.pubkey, 0, client))[0] for d in devices]
    code = h.code(secret)
    results = await asyncio.gather(*(h.client.finish(t, code, None, client) for t in tokens), return_exceptions=True)
    assert sum(not isinstance(r, Exception) for r in results) == 1, results
    failed = await h.events("mfa.failed")
    assert [e["reason"] for e in failed] == ["replayed_code"]


async def test_totp_accepts_the_previous_step_but_never_an_older_one_after_a_newer(h: Harness) -> None:
    location, _ = await h.location()
    secret = await h.user()
    device = await h.device("alice", "laptop", "office")
    h.clock.advance(60)
    await h.login(location.id, device.pubkey, h.code(secret, -30))  # T-1
    h.clock.advance(30)
    await h.login(location.id, device.pubkey, h.code(secret))  # T
    await expect_failure(h.login(location.id, device.pubkey, h.code(secret, -30)), ErrorStatus.UNAUTHENTICATED)  # T-1 again
    await expect_failure(h.login(location.id, device.pubkey, h.code(secret, 30)), ErrorStatus.UNAUTHENTICATED)  # T+1
    await expect_failure(h.login(location.id, device.pubkey, h.code(secret, -60)), ErrorStatus.UNAUTHENTICATED)  # T-2


async def test_failed_codes_kill_the_login_and_lock_the_user_for_a_growing_while(h: Harness) -> None:
    location, _ = await h.location()
    secret = await h.user()
    device = await h.device("alice", "laptop", "office")
    client = rpc.ClientInfo()
    wrong = str((int(h.code(secret)) + 1) % 1_000_000).zfill(6)

    token, _ = await h.client.start(location.id, device.pubkey, 0, client)
    for _ in range(5):
        await expect_failure(h.client.finish(token, wrong, None, client), ErrorStatus.UNAUTHENTICATED, "unauthorized")
    await expect_failure(h.client.finish(token, h.code(secret), None, client), ErrorStatus.INVALID_ARGUMENT, "login session not found")
    locked = await h.events("mfa.locked")
    assert len(locked) == 1 and locked[0]["login_dead"] and locked[0]["user_locked_until"]

    refused = await expect_failure(h.client.start(location.id, device.pubkey, 0, client), ErrorStatus.RATE_LIMITED)
    assert 50 <= refused.error.retry_after_s <= 61
    h.clock.advance(61)
    await h.login(location.id, device.pubkey, h.code(secret), client)  # success resets the count

    # five more failures lock again for 60 s, not longer: the count restarted
    h.clock.advance(30)
    token, _ = await h.client.start(location.id, device.pubkey, 0, client)
    for _ in range(5):
        await expect_failure(h.client.finish(token, wrong, None, client), ErrorStatus.UNAUTHENTICATED)
    refused = await expect_failure(h.client.start(location.id, device.pubkey, 0, client), ErrorStatus.RATE_LIMITED)
    assert refused.error.retry_after_s <= 61

    # without a success in between, the next lock doubles
    h.clock.advance(61)
    token, _ = await h.client.start(location.id, device.pubkey, 0, client)
    for _ in range(5):
        await expect_failure(h.client.finish(token, wrong, None, client), ErrorStatus.UNAUTHENTICATED)
    refused = await expect_failure(h.client.start(location.id, device.pubkey, 0, client), ErrorStatus.RATE_LIMITED)
    assert 110 <= refused.error.retry_after_s <= 121


async def test_login_tokens_expire_after_five_minutes(h: Harness) -> None:
    location, _ = await h.location()
    secret = await h.user()
    device = await h.device("alice", "laptop", "office")
    client = rpc.ClientInfo()
    token, _ = await h.client.start(location.id, device.pubkey, 0, client)
    h.clock.advance(299)
    token2, _ = await h.client.start(location.id, device.pubkey, 0, client)
    h.clock.advance(301)
    await expect_failure(h.client.finish(token2, h.code(secret), None, client), ErrorStatus.INVALID_ARGUMENT, "login session not found")
    assert await h.sql("SELECT state FROM mfa_login ORDER BY created_at") == [("expired",), ("expired",)]


async def test_admin_revoke_removes_the_peer_and_forgets_the_psk(h: Harness) -> None:
    location, _ = await h.location()
    secret = await h.user()
    device = await h.device("alice", "laptop", "office")
    await h.login(location.id, device.pubkey, h.code(secret))
    session_id = (await h.admin.call("sessions", rpc.SessionsRequest(), rpc.SessionsResult)).sessions[0].id

    info = await h.admin.call("revoke", rpc.RevokeRequest(session_id=session_id), rpc.SessionInfo)
    assert (info.state.value, info.revoke_reason) == ("revoked", "admin")
    state = (await PeerLog(h.bus).last_peer_state(location.id, device.device_id)).state
    assert isinstance(state, PeerRevoked) and (state.generation, state.reason) == (1, "admin")
    assert await h.sql("SELECT psk_enc FROM vpn_session") == [(None,)]
    await expect_failure(h.admin.call("revoke", rpc.RevokeRequest(session_id=session_id), rpc.SessionInfo), ErrorStatus.CONFLICT)
    await expect_failure(h.admin.call("revoke", rpc.RevokeRequest(session_id=999), rpc.SessionInfo), ErrorStatus.NOT_FOUND)


async def test_a_location_without_mfa_authorizes_devices_when_added(h: Harness) -> None:
    location, _ = await h.location("lab", mfa_mode="disabled", threshold_s=30)
    await h.admin.call("user_add", rpc.UserAddRequest(username="bob", email="bob@example.com"), rpc.UserInfo)
    device = await h.device("bob", "laptop", "lab")
    state = (await PeerLog(h.bus).last_peer_state(location.id, device.device_id)).state
    assert isinstance(state, PeerAuthorized)
    assert (state.psk_sealed, state.threshold_s, state.expires_at, state.session_id) == (None, None, None, None)
    assert state.allowed_ips == ["10.10.0.2/32"]
    await expect_failure(
        h.client.start(location.id, device.pubkey, 0, rpc.ClientInfo()), ErrorStatus.INVALID_ARGUMENT, "MFA not enabled for location"
    )


async def test_threshold_floor_follows_the_settings(nats_url: str, database_url: str, tmp_path: Path) -> None:
    settings = CoreSettings(
        nats_url=nats_url, database_url=database_url, state_dir=tmp_path, min_threshold_s=20, stats_interval=5
    )
    core = Core(settings)
    await core.start()
    bus = await Bus.connect(nats_url, "test", wait_s=5)
    admin = AdminClient(bus, 10)
    try:

        def add(name: str, threshold: int, mfa: str = "internal"):  # type: ignore[no-untyped-def]
            return admin.call(
                "location_add",
                rpc.LocationAddRequest(
                    name=name, endpoint="192.0.2.1:51820", network=f"10.1.{ord(name)}.0/24", mfa_mode=mfa, threshold_s=threshold,
                    reply_key=admin.reply_key.public,
                ),
                rpc.LocationAddResult,
            )

        failure = await expect_failure(add("a", 29), ErrorStatus.INVALID_ARGUMENT)
        assert "below the floor of 30 s" in failure.error.message
        assert (await add("b", 30)).location.threshold_s == 30
        assert (await add("c", 5, "disabled")).location.threshold_s == 5
    finally:
        await bus.close()
        await core.stop()


async def test_location_and_device_validation(h: Harness) -> None:
    for kwargs, needle in [
        ({"network": "10.0.0.1/24"}, "host bits set"),
        ({"network": "banana"}, "invalid network"),
        ({"endpoint": "no-port"}, "HOST:PORT"),
        ({"lifetime_s": 10}, "lifetime"),
    ]:
        failure = await expect_failure(h.location("x", **kwargs), ErrorStatus.INVALID_ARGUMENT)
        assert needle in failure.error.message
    await expect_failure(h.location("123"), ErrorStatus.INVALID_ARGUMENT)
    await h.location("tiny", network="10.9.0.0/30")
    await expect_failure(h.location("tiny", network="10.9.1.0/30"), ErrorStatus.CONFLICT, "location tiny already exists")

    await h.user("alice")
    first = await h.device("alice", "laptop", "tiny")
    assert first.address == "10.9.0.2/30" and first.allowed_ips == ["10.9.0.0/30"]
    full = await expect_failure(h.device("alice", "phone", "tiny"), ErrorStatus.CONFLICT)
    assert "no free address" in full.error.message
    await expect_failure(
        h.admin.call("device_add", rpc.DeviceAddRequest(username="alice", name="x", location="tiny", pubkey="short"), rpc.DeviceConfig),
        ErrorStatus.INVALID_ARGUMENT,
    )
    await expect_failure(
        h.admin.call(
            "device_add", rpc.DeviceAddRequest(username="alice", name="laptop", location="tiny", pubkey=first.pubkey), rpc.DeviceConfig
        ),
        ErrorStatus.CONFLICT,
        "device laptop is already at location tiny",
    )
    await expect_failure(h.device("nobody", "x", "tiny"), ErrorStatus.NOT_FOUND, "user nobody not found")
    await expect_failure(h.device("alice", "x", "nowhere"), ErrorStatus.NOT_FOUND, "location nowhere not found")


async def test_secrets_are_encrypted_at_rest(h: Harness) -> None:
    location, credentials = await h.location()
    secret = await h.user()
    device = await h.device("alice", "laptop", "office")
    psk = await h.login(location.id, device.pubkey, h.code(secret))
    dump = repr(await h.sql("SELECT * FROM \"user\"")) + repr(await h.sql("SELECT * FROM vpn_session"))
    dump += repr(await h.sql("SELECT * FROM location")) + repr(await h.sql("SELECT * FROM mfa_login"))
    for value in (secret, psk, credentials["private_key"], credentials["sealing_private_key"]):
        assert value not in dump


async def test_audit_events_tell_the_story_of_a_login(h: Harness) -> None:
    location, _ = await h.location()
    secret = await h.user()
    device = await h.device("alice", "laptop", "office")
    client = rpc.ClientInfo(ip="198.51.100.7")
    token, _ = await h.client.start(location.id, device.pubkey, 0, client)
    wrong = str((int(h.code(secret)) + 1) % 1_000_000).zfill(6)
    with pytest.raises(RpcFailure):
        await h.client.finish(token, wrong, None, client)
    await h.client.finish(token, h.code(secret), None, client)
    story = [e for e in await h.events() if e["type"].split(".")[0] in ("mfa", "session")]
    assert [e["type"] for e in story] == ["mfa.started", "mfa.failed", "session.authorized", "mfa.succeeded"]
    assert all(e["username"] == "alice" and e["device_name"] == "laptop" for e in story)
    assert story[1]["reason"] == "wrong_code" and story[1]["client_ip"] == "198.51.100.7"


async def session_states(h: Harness) -> list[tuple[str, str | None]]:
    sessions = (await h.admin.call("sessions", rpc.SessionsRequest(), rpc.SessionsResult)).sessions
    return [(s.state.value, s.revoke_reason) for s in sessions]


async def login_reaped_as_idle(h: Harness) -> tuple[rpc.LocationInfo, rpc.DeviceConfig, str]:
    """alice logs in from her laptop at the office, and the reaper revokes that session as
    idle (as it publishes: over the authorization it saw); once the core has ended it, her
    location, device and TOTP secret."""
    location, _ = await h.location()
    secret = await h.user()
    device = await h.device("alice", "laptop", "office")
    await h.login(location.id, device.pubkey, h.code(secret))
    authorized = (await PeerLog(h.bus).last_peer_state(location.id, device.device_id))
    revoke = PeerRevoked(location_id=location.id, device_id=device.device_id, generation=1,
                         session_id=authorized.state.session_id, pubkey=device.pubkey, reason="idle")
    await h.bus.publish(subjects.peer(location.id, device.device_id), revoke, expected_last_subject_seq=authorized.sequence)

    async def revoked() -> bool:
        return await session_states(h) == [("revoked", "idle")]

    await eventually(revoked, what="the core to end the session")
    return location, device, secret


async def test_a_revoke_from_the_reaper_ends_the_session(h: Harness) -> None:
    await login_reaped_as_idle(h)
    assert await h.sql("SELECT psk_enc FROM vpn_session") == [(None,)]
    assert [(e["reason"], e["previous_state"]) for e in await h.events("session.revoked")] == [("idle", "authorized")]


async def test_after_the_reapers_revoke_the_next_login_is_published_without_reading_the_peer_log(h: Harness) -> None:
    location, device, secret = await login_reaped_as_idle(h)
    reads = []
    read = h.core.peers.last_peer_state

    async def counted(location_id: int, device_id: int):  # type: ignore[no-untyped-def]
        reads.append(device_id)
        return await read(location_id, device_id)

    h.core.peers.last_peer_state = counted  # type: ignore[method-assign]
    h.clock.advance(30)
    psk = await h.login(location.id, device.pubkey, h.code(secret))
    assert reads == []  # its consumer delivered the revoke: the core knew what it publishes over
    state = (await PeerLog(h.bus).last_peer_state(location.id, device.device_id)).state
    assert isinstance(state, PeerAuthorized) and state.generation == 2 and psk


async def test_the_first_handshake_after_authorization_marks_the_session_connected(h: Harness) -> None:
    location, _ = await h.location()
    secret = await h.user()
    device = await h.device("alice", "laptop", "office")
    await h.login(location.id, device.pubkey, h.code(secret))
    gateway_clock = datetime.now(timezone.utc) + timedelta(hours=3)  # the gateway's clock is way off

    async def report(handshake_age_s: float) -> None:
        sample = StatsSample(location_id=location.id, gateway_id="gw1", sample_id=uuid7(), sampled_at=gateway_clock,
                             peers=[PeerSample(pubkey=device.pubkey, rx_bytes=1, tx_bytes=1,
                                               latest_handshake=gateway_clock - timedelta(seconds=handshake_age_s))])
        await h.bus.publish(subjects.stats(location.id, "gw1"), sample)

    await report(600)  # a handshake from before this session: not a connection
    await asyncio.sleep(0.5)
    assert await session_states(h) == [("authorized", None)]
    await report(0)

    async def connected() -> bool:
        return await session_states(h) == [("connected", None)]

    await eventually(connected, what="session.connected")
    events = await h.events("session.connected")
    assert len(events) == 1 and events[0]["gateway_id"] == "gw1"


# --- the login path under attack -------------------------------------------------------------

OWNER = rpc.ClientInfo(ip="192.0.2.10")
ATTACKER = rpc.ClientInfo(ip="198.51.100.7")


def wrong_codes(h: Harness, secret: str, count: int) -> list[str]:
    """Codes that are wrong for every step the core accepts now."""
    valid = {h.code(secret, offset) for offset in (-30, 0)}
    candidates = (str((int(h.code(secret)) + k) % 1_000_000).zfill(6) for k in range(1, 100))
    return [c for c in candidates if c not in valid][:count]


async def failed_events(h: Harness, count: int) -> list[dict]:
    """The mfa.failed events, once `count` of them were published."""
    async def published() -> bool:
        return len(await h.events("mfa.failed")) >= count

    await eventually(published, timeout=15)
    return await h.events("mfa.failed")


async def test_racing_codes_on_one_login_are_checked_at_most_max_failed_attempts_times(h: Harness) -> None:
    location, _ = await h.location()
    secret = await h.user()
    device = await h.device("alice", "laptop", "office")
    token, _ = await h.client.start(location.id, device.pubkey, 0, ATTACKER)
    codes = [*wrong_codes(h, secret, 9), h.code(secret)]  # the right one last, all at once
    results = await asyncio.gather(*(h.client.finish(token, c, None, ATTACKER) for c in codes), return_exceptions=True)

    successes = [r for r in results if not isinstance(r, Exception)]
    refused = [r for r in results if isinstance(r, RpcFailure) and r.error.status == ErrorStatus.UNAUTHENTICATED]
    assert all(isinstance(r, RpcFailure) for r in results if r not in successes), results
    # every refusal is audited, and at most max_failed_attempts (5) codes were checked
    failed = await failed_events(h, len(refused))
    assert len(failed) == len(refused), (failed, results)
    checked = [e for e in failed if e["reason"] != "attempts_exhausted"]
    assert len(checked) + len(successes) <= 5, failed
    assert [e["reason"] for e in failed if e not in checked] == ["attempts_exhausted"] * (len(failed) - len(checked))
    assert await h.sql("SELECT attempts FROM mfa_login") == [(len(checked) + len(successes),)]  # one per check
    if successes:
        assert len(checked) < 5  # the right code was among the first five checked


async def test_failures_from_one_address_lock_that_address_before_the_owner(h: Harness) -> None:
    location, _ = await h.location()
    secret = await h.user()
    device = await h.device("alice", "laptop", "office")
    token, _ = await h.client.start(location.id, device.pubkey, 0, ATTACKER)
    for code in wrong_codes(h, secret, 5):
        await expect_failure(h.client.finish(token, code, None, ATTACKER), ErrorStatus.UNAUTHENTICATED)
    refused = await expect_failure(h.client.start(location.id, device.pubkey, 0, ATTACKER), ErrorStatus.RATE_LIMITED)
    assert 50 <= refused.error.retry_after_s <= 61
    locked = await h.events("mfa.locked")
    assert [(e["client_ip"], e["hard_locked"], bool(e["user_locked_until"])) for e in locked] == [(ATTACKER.ip, False, True)]
    # the owner, elsewhere, logs in as usual
    assert await h.login(location.id, device.pubkey, h.code(secret), OWNER)


async def test_a_start_from_another_address_leaves_the_owners_login_alone(h: Harness) -> None:
    location, _ = await h.location()
    secret = await h.user()
    device = await h.device("alice", "laptop", "office")
    owners, _ = await h.client.start(location.id, device.pubkey, 0, OWNER)
    await h.client.start(location.id, device.pubkey, 0, ATTACKER)
    await h.client.start(location.id, device.pubkey, 0, ATTACKER)  # replaces the attacker's own
    await h.client.finish(owners, h.code(secret), None, OWNER)
    assert sorted(await h.sql("SELECT client_ip, state FROM mfa_login")) == [
        ("192.0.2.10", "finished"), ("198.51.100.7", "expired"), ("198.51.100.7", "pending"),
    ]
    # from the same address a new start replaces the previous login
    first, _ = await h.client.start(location.id, device.pubkey, 0, OWNER)
    await h.client.start(location.id, device.pubkey, 0, OWNER)
    h.clock.advance(30)
    await expect_failure(h.client.finish(first, h.code(secret), None, OWNER), ErrorStatus.INVALID_ARGUMENT, "login session not found")
    # beyond three live logins per device, the oldest goes
    for n in range(3):
        await h.client.start(location.id, device.pubkey, 0, rpc.ClientInfo(ip=f"203.0.113.{n + 1}"))
    live = await h.sql("SELECT client_ip FROM mfa_login WHERE state = 'pending' ORDER BY client_ip")
    assert live == [("203.0.113.1",), ("203.0.113.2",), ("203.0.113.3",)]


async def test_a_hundred_failures_in_a_row_lock_the_user_until_an_admin_unlocks(h: Harness) -> None:
    location, _ = await h.location()
    secret = await h.user()
    device = await h.device("alice", "laptop", "office")
    for n in range(20):  # 20 addresses, 5 wrong codes each; an hour apart, past any lock of a while
        client = rpc.ClientInfo(ip=f"203.0.113.{n + 1}")
        token, _ = await h.client.start(location.id, device.pubkey, 0, client)
        for code in wrong_codes(h, secret, 5):
            await expect_failure(h.client.finish(token, code, None, client), ErrorStatus.UNAUTHENTICATED)
        h.clock.advance(3601)
    failure = await expect_failure(h.client.start(location.id, device.pubkey, 0, OWNER), ErrorStatus.PERMISSION_DENIED)
    assert "administrator" in failure.error.message
    hard = [e for e in await h.events("mfa.locked") if e["hard_locked"]]
    assert len(hard) == 1 and hard[0]["client_ip"] == "203.0.113.20"
    h.clock.advance(2 * 86400)
    await expect_failure(h.client.start(location.id, device.pubkey, 0, OWNER), ErrorStatus.PERMISSION_DENIED)

    async with h.core.db.transaction() as session:
        await reset_failures(session, (await h.sql("SELECT id FROM \"user\" WHERE username = 'alice'"))[0][0])
    assert await h.login(location.id, device.pubkey, h.code(secret), OWNER)


async def test_mail_starts_from_elsewhere_never_end_a_login_already_started(
    nats_url: str, database_url: str, tmp_path: Path
) -> None:
    sink = MailSink().start()
    try:
        async with running_core(nats_url, database_url, tmp_path, smtp_host="127.0.0.1", smtp_port=sink.port) as h:
            location, _ = await h.location()
            await h.user()
            await h.admin.call("email_mfa", rpc.EmailMfaRequest(username="alice", enabled=True), rpc.UserInfo)
            device = await h.device("alice", "laptop", "office")
            owners, _ = await h.client.start(location.id, device.pubkey, 1, OWNER)
            code = re.search(r"Your code: (\d{6})", sink.wait_for(1)[0].body).group(1)  # type: ignore[union-attr]
            for _ in range(2):
                await h.client.start(location.id, device.pubkey, 1, ATTACKER)
            # the per-user mail limit holds (3 per 5 minutes) ...
            await expect_failure(h.client.start(location.id, device.pubkey, 1, ATTACKER), ErrorStatus.RATE_LIMITED)
            # ... and the owner's login, started before, finishes with its code
            psk, _ = await h.client.finish(owners, code, None, OWNER)
            assert len(base64.b64decode(psk)) == 32
    finally:
        sink.stop()


async def test_every_stream_is_bounded_in_bytes_and_age_from_the_settings(
    nats_url: str, database_url: str, tmp_path: Path
) -> None:
    limits = {"events_max_bytes": 64 * 1024, "dlq_max_bytes": 70_000, "stats_max_bytes": 80_000, "peers_max_bytes": 90_000,
              "events_max_age_s": 86400, "dlq_max_age_s": 7200, "stats_max_age_s": 600}
    async with running_core(nats_url, database_url, tmp_path, **limits) as h:
        configs = {name: (await nats_direct.jetstream(h.bus.broker, 5).stream_info(name)).config
                   for name in ("WGMFA_EVENTS", "WGMFA_DLQ", "WGMFA_STATS", "WGMFA_PEERS")}
        assert {name: c.max_bytes for name, c in configs.items()} == {
            "WGMFA_EVENTS": 64 * 1024, "WGMFA_DLQ": 70_000, "WGMFA_STATS": 80_000, "WGMFA_PEERS": 90_000}
        assert [configs[n].max_age for n in ("WGMFA_EVENTS", "WGMFA_DLQ", "WGMFA_STATS")] == [86400, 7200, 600]

        # anyone who knows a device's public key can start logins; the audit trail they
        # write stays within its bytes, the oldest events going first
        location, _ = await h.location()
        await h.user()
        device = await h.device("alice", "laptop", "office")
        for n in range(250):
            await h.client.start(location.id, device.pubkey, 0, rpc.ClientInfo(ip=f"198.51.100.{n % 200}"))

        async def trimmed() -> bool:
            state = (await nats_direct.jetstream(h.bus.broker, 5).stream_info("WGMFA_EVENTS")).state
            return state.first_seq > 1 and state.messages >= 100

        await eventually(trimmed, timeout=20)
        assert (await nats_direct.jetstream(h.bus.broker, 5).stream_info("WGMFA_EVENTS")).state.bytes <= 64 * 1024


async def test_unfinished_logins_are_dropped_after_an_hour_finished_ones_kept(h: Harness) -> None:
    location, _ = await h.location()
    secret = await h.user()
    device = await h.device("alice", "laptop", "office")
    for n in range(30):  # what anyone who knows the public key can do
        await h.client.start(location.id, device.pubkey, 0, rpc.ClientInfo(ip=f"198.51.100.{n}"))
    await h.login(location.id, device.pubkey, h.code(secret), OWNER)
    h.clock.advance(3601)
    await h.core.mfa.expire_logins()
    assert await h.sql("SELECT state FROM mfa_login") == [("finished",)]


async def test_a_login_whose_attempts_are_all_taken_refuses_even_the_right_code_unchecked(h: Harness) -> None:
    location, _ = await h.location()
    secret = await h.user()
    device = await h.device("alice", "laptop", "office")
    token, _ = await h.client.start(location.id, device.pubkey, 0, OWNER)
    async with h.core.db.transaction() as session:  # taken by checks that were never recorded
        await session.exec(text("UPDATE mfa_login SET attempts = 5"))  # type: ignore[call-overload]
    await expect_failure(h.client.finish(token, h.code(secret), None, OWNER), ErrorStatus.UNAUTHENTICATED)
    failed = await failed_events(h, 1)
    assert [(e["reason"], e["failed_attempts"]) for e in failed] == [("attempts_exhausted", 0)]
    # not counted as a wrong code: the user's and the address's counters are untouched
    assert await h.sql("SELECT attempts, failed_attempts, state FROM mfa_login") == [(5, 0, "pending")]
    assert await h.sql('SELECT mfa_failures FROM "user"') == [(0,)]
