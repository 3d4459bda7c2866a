"""Enrollment in the core, on SQLite and on PostgreSQL, with a fake clock."""
from __future__ import annotations

import asyncio
import json
from datetime import timedelta

import pyotp

from core_service.keys import ENROLLMENT_COOKIE, OIDC_COOKIE, Vault, new_token
from events.peer_log import PeerLog
from events import subjects
from schemas.sealing import ReplyKey, generate_keypair, seal
from schemas import rpc
from schemas.rpc import ErrorStatus
from tests.test_core import Harness, expect_failure, h  # noqa: F401  (h is the fixture)


class App:
    """Calls the enrollment RPCs as the proxy does."""

    def __init__(self, h: Harness) -> None:
        self.h = h
        self.reply = ReplyKey()
        self.cookie: str | None = None

    async def sealed(self, value: str) -> str:
        return seal(await self.h.client.core_key(), value)

    async def token(self, username: str, ttl_s: int = 3600, device_name: str | None = None) -> str:
        created = await self.h.admin.call(
            "enroll_create", rpc.EnrollCreateRequest(username=username, ttl_s=ttl_s, device_name=device_name,
                                                     reply_key=self.h.admin.reply_key.public),
            rpc.EnrollCreateResult,
        )
        return self.h.admin.reply_key.open(created.token_sealed)

    async def start(self, token: str) -> rpc.EnrollStartResult:
        result = await self.h.bus.call(
            subjects.RPC_ENROLL_START,
            rpc.EnrollStartRequest(token_sealed=await self.sealed(token), reply_key=self.reply.public),
            rpc.EnrollStartResult, timeout=10,
        )
        self.cookie = self.reply.open(result.cookie_sealed)
        return result

    async def session(self) -> dict:
        return {"cookie_sealed": await self.sealed(self.cookie) if self.cookie else None}

    async def factor_start(self, method: int = 0) -> str | None:
        result = await self.h.bus.call(
            subjects.RPC_ENROLL_FACTOR_START,
            rpc.EnrollFactorStartRequest(**await self.session(), method=method, reply_key=self.reply.public),
            rpc.EnrollFactorStartResult, timeout=10,
        )
        return self.reply.open(result.totp_secret_sealed) if result.totp_secret_sealed else None

    async def factor_finish(self, code: str) -> None:
        await self.h.bus.call(
            subjects.RPC_ENROLL_FACTOR_FINISH,
            rpc.EnrollFactorFinishRequest(**await self.session(), code_sealed=await self.sealed(code)), rpc.Empty, timeout=10,
        )

    async def create_device(self, name: str = "laptop") -> rpc.AppDeviceConfigResult:
        return await self.h.bus.call(
            subjects.RPC_ENROLL_CREATE_DEVICE,
            rpc.EnrollCreateDeviceRequest(**await self.session(), name=name, pubkey=generate_keypair()[1],
                                          reply_key=self.reply.public),
            rpc.AppDeviceConfigResult, timeout=10,
        )

    async def poll(self, token: str) -> rpc.AppDeviceConfigResult:
        return await self.h.bus.call(
            subjects.RPC_ENROLL_POLL, rpc.PollRequest(token_sealed=await self.sealed(token), reply_key=self.reply.public),
            rpc.AppDeviceConfigResult, timeout=10,
        )


async def plain_user(h: Harness, username: str) -> None:
    await h.admin.call("user_add", rpc.UserAddRequest(username=username, email=f"{username}@example.com"), rpc.UserInfo)


async def test_a_token_starts_one_session_even_when_raced(h: Harness) -> None:
    await plain_user(h, "ann")
    app = App(h)
    token = await app.token("ann")
    results = await asyncio.gather(*(App(h).start(token) for _ in range(4)), return_exceptions=True)
    started = [r for r in results if isinstance(r, rpc.EnrollStartResult)]
    refused = [r for r in results if isinstance(r, rpc.RpcFailure)]
    assert len(started) == 1 and len(refused) == 3
    assert {(f.error.status, f.error.message) for f in refused} == {(ErrorStatus.UNAUTHENTICATED, "invalid token")}
    assert len(await h.events("enrollment.started")) == 1
    assert len(await h.events("enrollment.failed")) == 3


async def test_tokens_and_sessions_expire(h: Harness) -> None:
    await plain_user(h, "ben")
    app = App(h)
    late = await app.token("ben", ttl_s=60)
    token = await app.token("ben", ttl_s=3600)
    h.clock.advance(61)
    await expect_failure(app.start(late), ErrorStatus.UNAUTHENTICATED, "token expired")
    result = await app.start(token)
    assert result.deadline == h.clock.now() + timedelta(seconds=600) and result.user.enrolled is False
    h.clock.advance(601)
    await expect_failure(app.factor_start(), ErrorStatus.UNAUTHENTICATED, "Session expired")
    failed = await h.events("enrollment.failed")
    assert [e["reason"] for e in failed] == ["expired_token", "session_expired"]
    assert late not in json.dumps(failed) and app.cookie not in json.dumps(failed)


async def test_wrong_setup_codes_end_the_setup(h: Harness) -> None:
    await plain_user(h, "cid")
    app = App(h)
    await app.start(await app.token("cid"))
    secret = await app.factor_start()
    assert secret
    wrong = str((int(pyotp.TOTP(secret).at(h.clock.now())) + 1) % 1_000_000).zfill(6)
    for _ in range(5):
        await expect_failure(app.factor_finish(wrong), ErrorStatus.UNAUTHENTICATED, "invalid code")
    right = pyotp.TOTP(secret).at(h.clock.now())
    await expect_failure(app.factor_finish(right), ErrorStatus.INVALID_ARGUMENT, "MFA setup not started")
    users = (await h.admin.call("user_list", rpc.Empty(), rpc.UserListResult)).users
    assert not next(u for u in users if u.username == "cid").totp_enabled
    # starting over works, and the right code then sets it up
    secret = await app.factor_start()
    await app.factor_finish(pyotp.TOTP(secret).at(h.clock.now()))
    # a setup left half-way is forgotten once its session is over
    other = App(h)
    await plain_user(h, "cy")
    await other.start(await other.token("cy"))
    await other.factor_start()
    h.clock.advance(601)
    assert await h.core.enrollments.expire() == 1
    assert await h.sql("SELECT count(*) FROM enrollment WHERE setup_method IS NOT NULL") == [(0,)]
    users = (await h.admin.call("user_list", rpc.Empty(), rpc.UserListResult)).users
    assert next(u for u in users if u.username == "cid").totp_enabled


async def test_the_device_lands_at_every_location_and_polls_follow_new_ones(h: Harness) -> None:
    office, _ = await h.location("office", network="10.10.0.0/24")
    lab, _ = await h.location("lab", network="10.11.0.0/24", mfa_mode="disabled")
    await h.user("dee")
    app = App(h)
    started = await app.start(await app.token("dee"))
    assert started.user.enrolled is True
    created = await app.create_device()
    configs = {c.network_name: c for c in created.configs}
    assert set(configs) == {"office", "lab"}
    assert configs["lab"].location_mfa_mode == 1 and configs["office"].location_mfa_mode == 2
    # a location without MFA puts the new device on its gateways at once, without a PSK
    state = (await PeerLog(h.bus).last_peer_state(lab.id, created.device.id)).state
    assert state.type == "peer.authorized" and state.psk_sealed is None
    token = app.reply.open(created.token_sealed)

    # the admin's --device-name names the device, whatever the app proposes
    named = App(h)
    await named.start(await named.token("dee", device_name="dee-phone"))
    assert (await named.create_device("iPhone")).device.name == "dee-phone"

    await h.location("annex", network="10.12.0.0/24")
    polled = await app.poll(token)
    assert {c.network_name for c in polled.configs} == {"office", "lab", "annex"}
    assert len({c.assigned_ip for c in polled.configs}) == 3
    await expect_failure(app.poll("not-a-token"), ErrorStatus.PERMISSION_DENIED, "invalid token")


def test_the_cookie_opens_with_the_deployment_key_only() -> None:
    master = bytes(range(32))
    cookie = Vault(master).seal_cookie(ENROLLMENT_COOKIE, '{"e": "x"}')
    assert Vault(master).open_cookie(ENROLLMENT_COOKIE, cookie) == '{"e": "x"}'  # another core of the deployment
    assert Vault(bytes(32)).open_cookie(ENROLLMENT_COOKIE, cookie) is None  # another deployment
    tampered = cookie[:-2] + ("AA" if cookie[-2:] != "AA" else "BB")
    assert Vault(master).open_cookie(ENROLLMENT_COOKIE, tampered) is None
    assert Vault(master).open_cookie(ENROLLMENT_COOKIE, "garbage!") is None
    assert Vault(master).open_cookie(OIDC_COOKIE, cookie) is None  # never taken for a browser's OIDC cookie
    assert all(c.isalnum() or c in "-_" for c in cookie)  # a cookie value as is


def test_tokens_people_paste_are_never_read_as_a_command_line_option() -> None:
    # enrollment tokens go into `wgmfa client enroll URL TOKEN`; one that began with "-"
    # was taken for an option and the enrollment failed
    tokens = [new_token(192) for _ in range(2000)]
    assert all(t.isascii() and t.isalnum() for t in tokens)
    assert min(len(t) for t in tokens) >= 33  # 62 ** 33 > 2 ** 192
    assert len(set(tokens)) == len(tokens)
