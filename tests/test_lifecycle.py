"""Offboarding and changes over a real bus, on SQLite and on PostgreSQL: users, factors,
devices and locations, each change revoking what it invalidates in its own transaction."""
from __future__ import annotations

from datetime import datetime, timedelta, timezone
from pathlib import Path

import pyotp
import pytest

from core_service.app import Core
from core_service.settings import CoreSettings
from events.peer_log import PeerLog
from events import subjects
from events.bus import Bus
from runtime.testing import FakeClock
from schemas.sealing import unseal
from schemas import rpc
from schemas.common import uuid7
from schemas.events import PeerAuthorized, PeerRevoked, PeerSample, StatsSample
from schemas.rpc import ErrorStatus
from tests.support.stack import eventually
from tests.test_core import Harness, expect_failure, h  # noqa: F401  (the fixture)
from wgmfa.admin import AdminClient, os_user


async def last_state(h: Harness, location_id: int, device_id: int) -> PeerAuthorized | PeerRevoked | None:
    record = await PeerLog(h.bus).last_peer_state(location_id, device_id)
    return record.state if record else None


async def live(h: Harness, **kw: object) -> list[rpc.SessionInfo]:
    request = rpc.SessionsRequest(include_revoked=False, **kw)  # type: ignore[arg-type]
    return (await h.admin.call("sessions", request, rpc.SessionsResult)).sessions


async def change(h: Harness, command: str, username: str) -> rpc.UserChangeResult:
    return await h.admin.call(command, rpc.UserChangeRequest(username=username), rpc.UserChangeResult)


async def test_disabling_a_user_revokes_everything_and_refuses_logins_until_enabled(h: Harness) -> None:
    office, _ = await h.location()
    lab, _ = await h.location("lab", mfa_mode="disabled", network="10.20.0.0/24")
    secret = await h.user()
    laptop = await h.device("alice", "laptop", "office")
    desktop = await h.device("alice", "desktop", "lab")
    await h.login(office.id, laptop.pubkey, h.code(secret))

    result = await change(h, "user_disable", "alice")
    assert (result.sessions_revoked, result.peers_removed, result.user.is_active) == (1, 2, False)
    # both peers leave: the MFA session's and the permanent one without MFA
    for location_id, device in ((office.id, laptop), (lab.id, desktop)):
        state = await last_state(h, location_id, device.device_id)
        assert isinstance(state, PeerRevoked) and state.reason == "user_disabled"
    assert await live(h) == []
    revoked = await h.events("session.revoked")
    assert [(e["username"], e["reason"]) for e in revoked] == [("alice", "user_disabled")]
    event = (await h.events("admin.user_disabled"))[0]
    assert (event["actor"], event["sessions_revoked"], event["changes"]) == (
        os_user(), 1, {"is_active": {"old": True, "new": False}}
    )
    h.clock.advance(30)
    await expect_failure(
        h.client.start(office.id, laptop.pubkey, 0, rpc.ClientInfo()), ErrorStatus.UNAUTHENTICATED, "unauthorized"
    )
    await expect_failure(change(h, "user_disable", "alice"), ErrorStatus.CONFLICT, "user alice is already disabled")

    enabled = await change(h, "user_enable", "alice")
    assert (enabled.user.is_active, enabled.peers_added) == (True, 1)
    state = await last_state(h, lab.id, desktop.device_id)
    assert isinstance(state, PeerAuthorized) and state.psk_sealed is None  # back at once without MFA
    assert not isinstance(await last_state(h, office.id, laptop.device_id), PeerAuthorized)  # MFA first
    await h.login(office.id, laptop.pubkey, h.code(secret))
    assert [s.state.value for s in await live(h)] == ["authorized"]


async def test_a_pending_login_dies_with_the_disable(h: Harness) -> None:
    office, _ = await h.location()
    secret = await h.user()
    laptop = await h.device("alice", "laptop", "office")
    token, _ = await h.client.start(office.id, laptop.pubkey, 0, rpc.ClientInfo())
    await change(h, "user_disable", "alice")
    await expect_failure(h.client.finish(token, h.code(secret), None, rpc.ClientInfo()), ErrorStatus.INVALID_ARGUMENT,
                         "login session not found")


async def test_deleting_a_user_keeps_the_trail_and_frees_the_name(h: Harness) -> None:
    office, _ = await h.location()
    secret = await h.user()
    laptop = await h.device("alice", "laptop", "office")
    await h.login(office.id, laptop.pubkey, h.code(secret))
    old_id = (await h.admin.call("user_show", rpc.UserRef(username="alice"), rpc.UserDetail)).user.id

    deleted = await change(h, "user_delete", "alice")
    assert (deleted.sessions_revoked, deleted.peers_removed) == (1, 1)
    state = await last_state(h, office.id, laptop.device_id)
    assert isinstance(state, PeerRevoked) and state.reason == "admin"
    await expect_failure(h.admin.call("user_show", rpc.UserRef(username="alice"), rpc.UserDetail), ErrorStatus.NOT_FOUND,
                         "user alice not found")
    assert "alice" not in [u.username for u in (await h.admin.call("user_list", rpc.Empty(), rpc.UserListResult)).users]
    # the device is gone for logins, as an unknown key is
    await expect_failure(h.client.start(office.id, laptop.pubkey, 0, rpc.ClientInfo()), ErrorStatus.INVALID_ARGUMENT,
                         "device not found")
    # the audit trail stays, and so do the sessions that name the old user
    assert [e["username"] for e in await h.events("admin.user_deleted")] == ["alice"]
    assert [e["username"] for e in await h.events("session.authorized")] == ["alice"]
    assert await h.sql("SELECT count(*) FROM vpn_session") == [(1,)]

    # a new alice is a different user; the same laptop key can join again as her device
    h.clock.advance(30)
    new_secret = await h.user("alice")
    detail = await h.admin.call("user_show", rpc.UserRef(username="alice"), rpc.UserDetail)
    assert detail.user.id != old_id and detail.devices == [] and detail.sessions == []
    readded = await h.admin.call(
        "device_add", rpc.DeviceAddRequest(username="alice", name="laptop", location="office", pubkey=laptop.pubkey),
        rpc.DeviceConfig,
    )
    assert readded.device_id != laptop.device_id
    await h.login(office.id, laptop.pubkey, h.code(new_secret))


async def test_a_removed_device_leaves_every_location_and_its_address_comes_back_after_the_revoke(h: Harness) -> None:
    office, _ = await h.location()
    lab, _ = await h.location("lab", mfa_mode="disabled", network="10.20.0.0/24")
    secret = await h.user()
    laptop = await h.device("alice", "laptop", "office")
    await h.admin.call(
        "device_add", rpc.DeviceAddRequest(username="alice", name="laptop", location="lab", pubkey=laptop.pubkey),
        rpc.DeviceConfig,
    )
    await h.login(office.id, laptop.pubkey, h.code(secret))

    removed = await h.admin.call("device_remove", rpc.DeviceRef(username="alice", device_name="laptop"), rpc.DeviceChangeResult)
    assert (removed.sessions_revoked, removed.peers_removed) == (1, 2)
    for location in (office, lab):
        assert isinstance(await last_state(h, location.id, laptop.device_id), PeerRevoked)
    assert (await h.admin.call("device_list", rpc.DeviceListRequest(), rpc.DeviceListResult)).devices == []
    await expect_failure(h.client.start(office.id, laptop.pubkey, 0, rpc.ClientInfo()), ErrorStatus.INVALID_ARGUMENT,
                         "device not found")
    await expect_failure(
        h.admin.call("device_remove", rpc.DeviceRef(username="alice", device_name="laptop"), rpc.DeviceChangeResult),
        ErrorStatus.NOT_FOUND, "device laptop of alice not found",
    )

    async def released() -> bool:
        return await h.sql(f"SELECT count(*) FROM location_device WHERE device_id = {laptop.device_id}") == [(0,)]

    await eventually(released, what="the addresses to be given back once the revokes are on the peer stream")
    again = await h.device("alice", "laptop", "office")
    assert again.address == laptop.address and again.device_id != laptop.device_id
    event = (await h.events("admin.device_removed"))[0]
    assert (event["device_name"], event["actor"], event["sessions_revoked"]) == ("laptop", os_user(), 1)


async def test_renaming_a_device(h: Harness) -> None:
    await h.location()
    await h.user()
    laptop = await h.device("alice", "laptop", "office")
    await h.device("alice", "phone", "office")
    renamed = await h.admin.call(
        "device_rename", rpc.DeviceRenameRequest(username="alice", device_name="laptop", new_name="work-laptop"),
        rpc.DeviceChangeResult,
    )
    assert (renamed.device_id, renamed.device_name) == (laptop.device_id, "work-laptop")
    await expect_failure(
        h.admin.call("device_rename", rpc.DeviceRenameRequest(username="alice", device_name="work-laptop", new_name="phone"),
                     rpc.DeviceChangeResult),
        ErrorStatus.CONFLICT,
    )
    events = await h.events("admin.device_renamed")
    assert events[0]["changes"] == {"name": {"old": "laptop", "new": "work-laptop"}}


async def test_the_last_factor_at_an_mfa_location_needs_force(h: Harness) -> None:
    await h.location()
    secret = await h.user()
    await h.device("alice", "laptop", "office")
    failure = await expect_failure(
        h.admin.call("totp_reset", rpc.FactorRemoveRequest(username="alice"), rpc.UserInfo), ErrorStatus.FAILED_PRECONDITION
    )
    assert "last second factor of alice" in failure.error.message and "office" in failure.error.message
    assert "--force" in failure.error.message
    assert (await h.admin.call("user_show", rpc.UserRef(username="alice"), rpc.UserDetail)).factors.totp  # unchanged

    # with another factor, TOTP can go; then email is the last one
    await h.admin.call("email_mfa", rpc.EmailMfaRequest(username="alice", enabled=True), rpc.UserInfo)
    user = await h.admin.call("totp_reset", rpc.FactorRemoveRequest(username="alice"), rpc.UserInfo)
    assert user.totp_enabled is False
    await expect_failure(
        h.admin.call("email_mfa", rpc.EmailMfaRequest(username="alice", enabled=False), rpc.UserInfo),
        ErrorStatus.FAILED_PRECONDITION,
    )
    user = await h.admin.call("email_mfa", rpc.EmailMfaRequest(username="alice", enabled=False, force=True), rpc.UserInfo)
    assert user.email_mfa_enabled is False
    types = [e["type"] for e in await h.events() if e["type"].startswith("admin.") and e.get("username") == "alice"]
    assert types[-3:] == ["admin.email_mfa_changed", "admin.totp_reset", "admin.email_mfa_changed"]
    assert secret  # (the old secret no longer matters)


async def test_a_re_enrolled_totp_works_only_after_confirmation(h: Harness) -> None:
    office, _ = await h.location()
    old_secret = await h.user()
    laptop = await h.device("alice", "laptop", "office")
    enrolled = await h.admin.call(
        "totp_enroll", rpc.TotpEnrollRequest(username="alice", reply_key=h.admin.reply_key.public), rpc.TotpEnrollResult
    )
    new_secret = pyotp.parse_uri(h.admin.reply_key.open(enrolled.otpauth_uri_sealed)).secret
    # until confirmed, the new secret is refused and the old one works
    token, _ = await h.client.start(office.id, laptop.pubkey, 0, rpc.ClientInfo())
    await expect_failure(h.client.finish(token, h.code(new_secret), None, rpc.ClientInfo()), ErrorStatus.UNAUTHENTICATED)
    await h.login(office.id, laptop.pubkey, h.code(old_secret))
    h.clock.advance(60)
    await h.admin.call(
        "totp_confirm",
        rpc.TotpConfirmRequest(username="alice", code_sealed=await h.admin.seal_for_core(h.code(new_secret, -30))),
        rpc.UserInfo,
    )
    token, _ = await h.client.start(office.id, laptop.pubkey, 0, rpc.ClientInfo())
    await expect_failure(h.client.finish(token, h.code(old_secret), None, rpc.ClientInfo()), ErrorStatus.UNAUTHENTICATED)
    await h.login(office.id, laptop.pubkey, h.code(new_secret))


async def test_unlock_lifts_a_lockout_and_show_tells_it(h: Harness) -> None:
    office, _ = await h.location()
    secret = await h.user()
    laptop = await h.device("alice", "laptop", "office")
    wrong = f"{(int(h.code(secret)) + 1) % 10**6:06d}"
    token, _ = await h.client.start(office.id, laptop.pubkey, 0, rpc.ClientInfo())
    for _ in range(5):
        await expect_failure(h.client.finish(token, wrong, None, rpc.ClientInfo()), ErrorStatus.UNAUTHENTICATED)
    detail = await h.admin.call("user_show", rpc.UserRef(username="alice"), rpc.UserDetail)
    assert detail.failed_attempts == 5 and detail.locked_until is not None
    await expect_failure(h.client.start(office.id, laptop.pubkey, 0, rpc.ClientInfo()), ErrorStatus.RATE_LIMITED)

    await change(h, "user_unlock", "alice")
    detail = await h.admin.call("user_show", rpc.UserRef(username="alice"), rpc.UserDetail)
    assert (detail.failed_attempts, detail.locked_until) == (0, None)
    await h.login(office.id, laptop.pubkey, h.code(secret))
    event = (await h.events("admin.user_unlocked"))[0]
    assert event["changes"]["failed_attempts"] == {"old": 5, "new": 0}


async def test_user_set_and_show(h: Harness) -> None:
    office, _ = await h.location()
    secret = await h.user()
    laptop = await h.device("alice", "laptop", "office")
    await h.login(office.id, laptop.pubkey, h.code(secret))
    await h.sql("SELECT 1")
    result = await h.admin.call("user_set", rpc.UserSetRequest(username="alice", email="a.new@example.org"), rpc.UserChangeResult)
    assert result.user.email == "a.new@example.org"
    event = (await h.events("admin.user_updated"))[0]
    assert event["changes"] == {"email": {"old": "a***@example.com", "new": "a***@example.org"}}
    detail = await h.admin.call("user_show", rpc.UserRef(username="alice"), rpc.UserDetail)
    assert (detail.factors.totp, detail.factors.email, detail.factors.mobile_keys) == (True, False, [])
    assert [d.device_name for d in detail.devices] == ["laptop"]
    assert [(s.device_name, s.state.value) for s in detail.sessions] == [("laptop", "authorized")]
    assert detail.oidc_issuer is None
    async with h.core.db.transaction() as session:
        from sqlalchemy import text

        await session.exec(text("UPDATE \"user\" SET oidc_issuer = 'https://idp.example.com', oidc_subject = 's-1'"))  # type: ignore[call-overload]
    detail = await h.admin.call("user_show", rpc.UserRef(username="alice"), rpc.UserDetail)
    assert (detail.oidc_issuer, detail.oidc_subject) == ("https://idp.example.com", "s-1")
    for call in (
        h.admin.call("user_set", rpc.UserSetRequest(username="nobody", email="x@example.com"), rpc.UserChangeResult),
        change(h, "user_disable", "nobody"),
        h.admin.call("totp_reset", rpc.FactorRemoveRequest(username="nobody"), rpc.UserInfo),
    ):
        await expect_failure(call, ErrorStatus.NOT_FOUND, "user nobody not found")


async def test_location_mode_changes_move_every_device(h: Harness) -> None:
    lab, credentials = await h.location("lab", mfa_mode="disabled", network="10.20.0.0/24", threshold_s=30)
    secret = await h.user()
    laptop = await h.device("alice", "laptop", "lab")
    assert isinstance(await last_state(h, lab.id, laptop.device_id), PeerAuthorized)

    # no MFA -> MFA: the unauthenticated peer leaves; it comes back through MFA
    with_mfa = await h.admin.call(
        "location_set", rpc.LocationSetRequest(location="lab", mfa_mode="internal", threshold_s=300), rpc.LocationChangeResult
    )
    assert with_mfa.changes == {"mfa_mode": ["disabled", "internal"], "peer_disconnect_threshold_s": [30, 300]}
    assert with_mfa.peers_removed == 1
    assert isinstance(await last_state(h, lab.id, laptop.device_id), PeerRevoked)
    await h.login(lab.id, laptop.pubkey, h.code(secret))
    state = await last_state(h, lab.id, laptop.device_id)
    assert isinstance(state, PeerAuthorized) and state.psk_sealed is not None and state.threshold_s == 300

    # a new threshold re-issues the live peer with the same PSK
    psk = unseal(credentials["sealing_private_key"], state.psk_sealed).decode()
    result = await h.admin.call(
        "location_set", rpc.LocationSetRequest(location="lab", threshold_s=400, keepalive_s=15), rpc.LocationChangeResult
    )
    assert result.peers_reissued == 1
    reissued = await last_state(h, lab.id, laptop.device_id)
    assert isinstance(reissued, PeerAuthorized) and reissued.generation > state.generation
    assert (reissued.threshold_s, reissued.keepalive_s) == (400, 15)
    assert unseal(credentials["sealing_private_key"], reissued.psk_sealed).decode() == psk
    assert [(s.generation, s.state.value) for s in await live(h)] == [(reissued.generation, "authorized")]

    # MFA -> none: the session ends and the device is on without PSK
    without = await h.admin.call("location_set", rpc.LocationSetRequest(location="lab", mfa_mode="disabled"), rpc.LocationChangeResult)
    assert (without.sessions_revoked, without.peers_reissued) == (1, 1)
    state = await last_state(h, lab.id, laptop.device_id)
    assert isinstance(state, PeerAuthorized) and state.psk_sealed is None and state.threshold_s is None
    assert await live(h) == []
    events = await h.events("admin.location_changed")
    assert [e["changes"].get("mfa_mode") for e in events] == [
        {"old": "disabled", "new": "internal"}, None, {"old": "internal", "new": "disabled"}
    ]
    assert all(e["actor"] == os_user() for e in events)


async def test_bad_location_changes_change_nothing(h: Harness) -> None:
    await h.location()
    await h.location("lab", network="10.20.0.0/24")
    before = (await h.admin.call("location_list", rpc.Empty(), rpc.LocationListResult)).locations
    for request, status, needle in [
        (rpc.LocationSetRequest(location="nowhere", threshold_s=300), ErrorStatus.NOT_FOUND, "location nowhere not found"),
        (rpc.LocationSetRequest(location="office", threshold_s=10), ErrorStatus.INVALID_ARGUMENT, "below the floor"),
        (rpc.LocationSetRequest(location="office", allowed_ips=["192.168.1.0/24", "192.168.2.1/24"], threshold_s=400),
         ErrorStatus.INVALID_ARGUMENT, "'192.168.2.1/24' is not a network"),
        (rpc.LocationSetRequest(location="office", allowed_ips=["banana"]), ErrorStatus.INVALID_ARGUMENT, "is not a network"),
        (rpc.LocationSetRequest(location="office", dns=["10.0.0.300"]), ErrorStatus.INVALID_ARGUMENT, "is not an IP address"),
        (rpc.LocationSetRequest(location="office", endpoint="no-port"), ErrorStatus.INVALID_ARGUMENT, "HOST:PORT"),
    ]:
        failure = await expect_failure(h.admin.call("location_set", request, rpc.LocationChangeResult), status)
        assert needle in failure.error.message, failure.error.message
    failure = await expect_failure(h.location("overlap", network="10.10.0.128/25"), ErrorStatus.INVALID_ARGUMENT)
    assert failure.error.message == "network 10.10.0.128/25 overlaps 10.10.0.0/24 of location office"
    assert (await h.admin.call("location_list", rpc.Empty(), rpc.LocationListResult)).locations == before
    assert await h.events("admin.location_changed") == []

    ok = await h.admin.call(
        "location_set", rpc.LocationSetRequest(location="office", allowed_ips=["192.168.1.0/24"], dns=["10.10.0.1"]),
        rpc.LocationChangeResult,
    )
    assert (ok.location.allowed_ips, ok.location.dns) == (["192.168.1.0/24"], ["10.10.0.1"])
    await h.user()
    device = await h.device("alice", "laptop", "office")
    assert device.allowed_ips == ["10.10.0.0/24", "192.168.1.0/24"]  # the client routes them through the tunnel


async def test_removing_a_location(h: Harness) -> None:
    office, _ = await h.location()
    secret = await h.user()
    laptop = await h.device("alice", "laptop", "office")
    await h.login(office.id, laptop.pubkey, h.code(secret))
    removed = await h.admin.call("location_remove", rpc.LocationRemoveRequest(location="office"), rpc.LocationChangeResult)
    assert (removed.sessions_revoked, removed.peers_removed) == (1, 1)
    assert isinstance(await last_state(h, office.id, laptop.device_id), PeerRevoked)
    assert (await h.admin.call("location_list", rpc.Empty(), rpc.LocationListResult)).locations == []
    await expect_failure(h.client.start(office.id, laptop.pubkey, 0, rpc.ClientInfo()), ErrorStatus.INVALID_ARGUMENT,
                         "location not found")
    # its name and network are free again; the new location is a different one
    again, _ = await h.location()
    assert again.id != office.id
    assert [e["location_name"] for e in await h.events("admin.location_removed")] == ["office"]


async def test_live_sessions_show_what_the_gateways_saw(h: Harness) -> None:
    office, _ = await h.location()
    secret = await h.user()
    laptop = await h.device("alice", "laptop", "office")
    await h.login(office.id, laptop.pubkey, h.code(secret))
    gateway_clock = datetime.now(timezone.utc) - timedelta(hours=2)  # the gateways' clocks are off
    h.clock.advance(10)  # the handshakes come after the login

    async def report(gateway_id: str, age_s: int, rx: int, endpoint: str) -> None:
        sample = StatsSample(
            location_id=office.id, gateway_id=gateway_id, sample_id=uuid7(), sampled_at=gateway_clock,
            peers=[PeerSample(pubkey=laptop.pubkey, rx_bytes=rx, tx_bytes=2 * rx, endpoint=endpoint,
                              latest_handshake=gateway_clock - timedelta(seconds=age_s))],
        )
        await h.bus.publish(subjects.stats(office.id, gateway_id), sample)

    await report("gw1", 40, 1000, "198.51.100.7:40000")
    await report("gw2", 5, 5000, "198.51.100.7:40001")  # the freshest handshake speaks for the peer

    async def seen() -> list[rpc.SessionInfo]:
        sessions = await live(h, location="office")
        return sessions if sessions and sessions[0].gateway_id == "gw2" else []

    info = (await eventually(seen, what="the samples in sessions --live"))[0]
    assert (info.endpoint, info.rx_bytes, info.tx_bytes) == ("198.51.100.7:40001", 5000, 10000)
    assert info.handshake_age_s == 5
    assert info.expires_in_s == office.lifetime_s - 10
    handshake_at = h.clock.now() - timedelta(seconds=5)
    assert info.idle_deadline == handshake_at + timedelta(seconds=office.threshold_s)
    h.clock.advance(60)
    info = (await live(h))[0]
    assert info.handshake_age_s == 65 and info.sampled_age_s == 60 and info.expires_in_s == office.lifetime_s - 70


async def test_a_disable_committed_but_not_published_is_published_by_the_next_core(
    nats_url: str, database_url: str, tmp_path: Path
) -> None:
    """The core dies between the commit of `user disable` and its publish: the revoke is
    in the outbox and the next core to start publishes it."""
    clock = FakeClock(datetime.now(timezone.utc).replace(microsecond=0))
    settings = CoreSettings(nats_url=nats_url, database_url=database_url, state_dir=tmp_path, publish_wait_s=0.5)
    core = Core(settings, clock=clock)
    await core.start()
    bus = await Bus.connect(nats_url, "test", wait_s=5)
    admin = AdminClient(bus, 10)
    try:
        await admin.call("location_add", rpc.LocationAddRequest(name="lab", endpoint="192.0.2.1:51820", network="10.20.0.0/24",
                                                                mfa_mode="disabled", reply_key=admin.reply_key.public),
                         rpc.LocationAddResult)
        await admin.call("user_add", rpc.UserAddRequest(username="alice", email="alice@example.com"), rpc.UserInfo)
        from schemas.sealing import generate_keypair

        device = await admin.call("device_add", rpc.DeviceAddRequest(username="alice", name="pc", location="lab",
                                                                     pubkey=generate_keypair()[1]), rpc.DeviceConfig)

        async def dies_before_publishing(state: object) -> bool:
            raise ConnectionError("the process is gone before its publish")

        core.peers.publish_peer_state = dies_before_publishing  # type: ignore[union-attr, method-assign, assignment]
        await admin.call("user_disable", rpc.UserChangeRequest(username="alice"), rpc.UserChangeResult)
        assert isinstance((await PeerLog(bus).last_peer_state(device.location_id, device.device_id)).state, PeerAuthorized)
    finally:
        await core.stop()
    restarted = Core(settings, clock=clock)
    await restarted.start()
    try:
        state = (await PeerLog(bus).last_peer_state(device.location_id, device.device_id)).state
        assert isinstance(state, PeerRevoked) and state.reason == "user_disabled"
    finally:
        await bus.close()
        await restarted.stop()


@pytest.mark.parametrize("command", ["user_disable", "user_enable", "user_delete", "user_unlock"])
async def test_unknown_users_are_refused(h: Harness, command: str) -> None:
    await expect_failure(change(h, command, "ghost"), ErrorStatus.NOT_FOUND, "user ghost not found")


async def test_a_new_network_renumbers_every_device(h: Harness) -> None:
    lab, _ = await h.location("lab", mfa_mode="disabled", network="10.20.0.0/24")
    office, _ = await h.location("office", network="10.30.0.0/24")
    secret = await h.user()
    desktop = await h.device("alice", "desktop", "lab")
    printer = await h.device("alice", "printer", "lab")
    laptop = await h.device("alice", "laptop", "office")
    await h.login(office.id, laptop.pubkey, h.code(secret))

    for network, needle in [
        ("10.30.0.0/25", "overlaps 10.30.0.0/24 of location office"),
        ("10.21.0.1/24", "host bits set"),
        ("10.21.0.0/30", "no room for the 2 devices"),
    ]:
        failure = await expect_failure(
            h.admin.call("location_set", rpc.LocationSetRequest(location="lab", network=network), rpc.LocationChangeResult),
            ErrorStatus.INVALID_ARGUMENT,
        )
        assert needle in failure.error.message, failure.error.message
    assert [d.address for d in (await h.admin.call("device_list", rpc.DeviceListRequest(), rpc.DeviceListResult)).devices] == [
        "10.20.0.2/24", "10.20.0.3/24", "10.30.0.2/24"
    ]

    # overlapping the old network on purpose: no address is held twice on the way
    moved = await h.admin.call("location_set", rpc.LocationSetRequest(location="lab", network="10.20.0.0/23"), rpc.LocationChangeResult)
    assert moved.changes["network"] == ["10.20.0.0/24", "10.20.0.0/23"] and moved.peers_reissued == 2
    assert moved.location.gateway_address == "10.20.0.1/23"
    for device, address in ((desktop, "10.20.0.2"), (printer, "10.20.0.3")):
        state = await last_state(h, lab.id, device.device_id)
        assert isinstance(state, PeerAuthorized) and state.allowed_ips == [f"{address}/32"] and state.generation == 2
    configs = (await h.admin.call("device_list", rpc.DeviceListRequest(), rpc.DeviceListResult)).devices
    assert [c.address for c in configs if c.location_name == "lab"] == ["10.20.0.2/23", "10.20.0.3/23"]

    # with MFA, the tunnel has the old address: the session ends and MFA comes first again
    renumbered = await h.admin.call(
        "location_set", rpc.LocationSetRequest(location="office", network="10.40.0.0/24"), rpc.LocationChangeResult
    )
    assert (renumbered.sessions_revoked, renumbered.peers_removed) == (1, 1)
    assert isinstance(await last_state(h, office.id, laptop.device_id), PeerRevoked)
    h.clock.advance(30)
    await h.login(office.id, laptop.pubkey, h.code(secret))
    state = await last_state(h, office.id, laptop.device_id)
    assert isinstance(state, PeerAuthorized) and state.allowed_ips == ["10.40.0.2/32"]


async def test_a_disabled_users_devices_stay_off_whatever_the_location_does(h: Harness) -> None:
    office, _ = await h.location()
    await h.user()
    laptop = await h.device("alice", "laptop", "office")
    await change(h, "user_disable", "alice")
    lab, _ = await h.location("lab", mfa_mode="disabled", network="10.20.0.0/24")
    desktop = await h.device("alice", "desktop", "lab")
    assert await last_state(h, lab.id, desktop.device_id) is None  # not put on while disabled
    result = await h.admin.call("location_set", rpc.LocationSetRequest(location="office", mfa_mode="disabled"),
                                rpc.LocationChangeResult)
    assert result.peers_reissued == 0
    assert not isinstance(await last_state(h, office.id, laptop.device_id), PeerAuthorized)
    enabled = await change(h, "user_enable", "alice")
    assert enabled.peers_added == 2  # both locations are without MFA now
    for location_id, device in ((office.id, laptop), (lab.id, desktop)):
        assert isinstance(await last_state(h, location_id, device.device_id), PeerAuthorized)
