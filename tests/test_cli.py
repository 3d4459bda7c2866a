"""`wgmfa admin` and `wgmfa events tail` as an operator runs them, against running services."""
from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from collections.abc import AsyncIterator
from datetime import datetime, timedelta
from pathlib import Path

import pyotp
import pytest
import pytest_asyncio

from events.bus import Bus
from schemas.common import utcnow
from tests.conftest import running_nats
from tests.support.stack import REPO, Stack, read_stream
from wgmfa.admin import os_user

pytestmark = pytest.mark.asyncio(loop_scope="module")


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def stack(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Stack]:
    with running_nats() as server:
        running = Stack(server.url, tmp_path_factory.mktemp("cli"), rate_limit_per_s="0")
        await running.start()
        yield running
        await running.stop()


async def wgmfa(stack: Stack, *args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "wgmfa", *args,
        env=stack.env, cwd=cwd or REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )
    out, err = await process.communicate()
    return subprocess.CompletedProcess(args, process.returncode, out.decode(), err.decode())


async def test_an_operator_sets_up_a_location_a_user_and_a_device(stack: Stack, tmp_path: Path) -> None:
    refused = await wgmfa(stack, "admin", "location", "add", "hq", "--endpoint", "vpn.example.com:51820",
                          "--network", "10.20.0.0/24", "--mfa", "internal", "--threshold", "120")
    assert refused.returncode == 1
    assert "below the floor of 240 s" in refused.stderr

    created = await wgmfa(stack, "admin", "location", "add", "hq", "--endpoint", "vpn.example.com:51820",
                          "--network", "10.20.0.0/24", "--mfa", "internal", "--json")
    assert created.returncode == 0, created.stderr
    document = json.loads(created.stdout)
    assert document["location"]["name"] == "hq" and document["location"]["threshold_s"] == 300
    assert set(document["credentials"]) >= {"private_key", "sealing_private_key", "location_id"}

    human = await wgmfa(stack, "admin", "location", "list")
    assert "hq" in human.stdout and "vpn.example.com:51820" in human.stdout

    credentials_file = tmp_path / "gw.json"
    gateway = await wgmfa(stack, "admin", "gateway", "add", "hq", "-o", str(credentials_file))
    assert gateway.returncode == 0, gateway.stderr
    assert json.loads(credentials_file.read_text())["private_key"] == document["credentials"]["private_key"]
    assert credentials_file.stat().st_mode & 0o777 == 0o600

    assert (await wgmfa(stack, "admin", "user", "add", "carol", "--email", "carol@example.com")).returncode == 0
    duplicate = await wgmfa(stack, "admin", "user", "add", "carol", "--email", "carol@example.com")
    assert (duplicate.returncode, duplicate.stderr.strip()) == (1, "wgmfa: user carol already exists")

    enrolled = await wgmfa(stack, "admin", "totp", "enroll", "carol")
    assert enrolled.returncode == 0
    uri = next(line for line in enrolled.stdout.splitlines() if line.startswith("otpauth://"))
    assert "▀" in enrolled.stdout or "█" in enrolled.stdout  # the QR code
    secret = pyotp.parse_uri(uri).secret
    wrong = await wgmfa(stack, "admin", "totp", "confirm", "carol", "000000" if pyotp.TOTP(secret).now() != "000000" else "111111")
    assert wrong.returncode == 1 and "does not match" in wrong.stderr
    previous = pyotp.TOTP(secret).at(utcnow() - timedelta(seconds=30))
    confirmed = await wgmfa(stack, "admin", "totp", "confirm", "carol", previous)
    if confirmed.returncode != 0:  # a step boundary passed in between
        confirmed = await wgmfa(stack, "admin", "totp", "confirm", "carol", pyotp.TOTP(secret).at(utcnow() - timedelta(seconds=30)))
    assert confirmed.returncode == 0, confirmed.stderr

    config_file = tmp_path / "laptop.json"
    added = await wgmfa(stack, "admin", "device", "add", "carol", "laptop", "--location", "hq", "-o", str(config_file))
    assert added.returncode == 0, added.stderr
    config = json.loads(config_file.read_text())
    assert config["address"] == "10.20.0.2/24" and config["endpoint"] == "vpn.example.com:51820"
    assert config["server_pubkey"] == document["location"]["server_pubkey"]
    assert config["keepalive_s"] == 25 and config["location_id"] == document["location"]["id"]
    assert len(config["private_key"]) == 44 and config["pubkey"] != config["private_key"]

    # a login through the proxy, then the operator sees and revokes the session
    start = await stack.http.post("/api/v1/client-mfa/start", json={"location_id": config["location_id"], "pubkey": config["pubkey"], "method": 0})
    finish = await stack.http.post("/api/v1/client-mfa/finish", json={"token": start.json()["token"], "code": pyotp.TOTP(secret).now()})
    assert finish.status_code == 200, finish.text
    listed = json.loads((await wgmfa(stack, "admin", "sessions", "--location", "hq", "--json")).stdout)
    assert [(s["username"], s["device_name"], s["state"]) for s in listed] == [("carol", "laptop", "authorized")]
    revoked = await wgmfa(stack, "admin", "revoke", str(listed[0]["id"]))
    assert revoked.returncode == 0 and "revoked" in revoked.stdout
    table = (await wgmfa(stack, "admin", "sessions")).stdout
    assert "revoked" in table and "admin" in table


async def test_events_tail_prints_events_as_they_happen(stack: Stack) -> None:
    tail = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "wgmfa", "events", "tail", "admin.*", "--count", "2",
        env=stack.env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )
    header = await asyncio.wait_for(tail.stdout.readline(), 15)
    assert b"following wgmfa.events.admin.*" in header
    await wgmfa(stack, "admin", "user", "add", "dave", "--email", "dave@example.com")
    await wgmfa(stack, "admin", "location", "add", "lab", "--endpoint", "192.0.2.9:51820", "--network", "10.30.0.0/24", "--mfa", "disabled")
    out, _ = await asyncio.wait_for(tail.communicate(), 15)
    lines = out.decode().splitlines()
    assert len(lines) == 2
    assert "admin.user_created" in lines[0] and "username=dave" in lines[0]
    assert "admin.location_created" in lines[1] and "location_name=lab" in lines[1]

    raw = await wgmfa(stack, "events", "tail", "--all", "--json", "--count", "1")
    assert json.loads(raw.stdout)["type"].startswith("admin.")


async def test_events_tail_since_replays_what_was_stored_in_that_window(stack: Stack) -> None:
    await wgmfa(stack, "admin", "user", "add", "ivy", "--email", "ivy@example.com")
    # nothing new happens meanwhile: the stored event is what it prints
    replayed = await asyncio.wait_for(
        wgmfa(stack, "events", "tail", "admin.user_created", "--since", "1h", "--json", "--count", "1"), 30
    )
    assert replayed.returncode == 0, replayed.stderr
    event = json.loads(replayed.stdout)
    assert event["type"] == "admin.user_created"
    assert utcnow() - timedelta(hours=1) <= datetime.fromisoformat(event["occurred_at"]) <= utcnow()


async def test_commands_explain_when_nothing_is_running(tmp_path: Path) -> None:
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "wgmfa", "admin", "user", "list",
        env={"WGMFA_NATS_URL": "nats://127.0.0.1:1", "PATH": "/usr/bin:/bin"}, cwd=REPO,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )
    _, err = await process.communicate()
    assert process.returncode == 3
    assert b"is `wgmfa up` running?" in err


async def test_events_tail_into_head_exits_quietly(stack: Stack) -> None:
    for name in ("erin", "frank", "grace"):
        await wgmfa(stack, "admin", "user", "add", name, "--email", f"{name}@example.com")
    tail = subprocess.Popen([sys.executable, "-m", "wgmfa", "events", "tail", "--all"], env=stack.env, cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    head = subprocess.run(["head", "-1"], stdin=tail.stdout, capture_output=True, timeout=30)
    assert tail.stdout is not None
    tail.stdout.close()  # head has gone: nobody reads the pipe any more
    await wgmfa(stack, "admin", "user", "add", "heidi", "--email", "heidi@example.com")  # the next line tail writes
    _, err = tail.communicate(timeout=30)
    assert b"following wgmfa.events.>" in head.stdout
    assert (tail.returncode, err.decode()) == (0, "")


async def test_events_tail_says_when_the_bus_goes_away(tmp_path: Path) -> None:
    with running_nats() as server:
        bus = await Bus.connect(server.url, "test", wait_s=5)
        await bus.ensure_streams()
        await bus.close()
        env = {"WGMFA_NATS_URL": server.url, "PATH": "/usr/bin:/bin", "PYTHONUNBUFFERED": "1"}
        tail = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "wgmfa", "events", "tail", env=env, cwd=REPO,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        )
        try:
            assert tail.stdout is not None and tail.stderr is not None
            assert b"following" in await asyncio.wait_for(tail.stdout.readline(), 30)
            server.stop()
            said = await asyncio.wait_for(tail.stderr.readline(), 30)
            assert said.decode().startswith(f"wgmfa: lost the connection to NATS at {server.url}")
        finally:
            if tail.returncode is None:
                tail.terminate()
            await tail.wait()


async def test_client_connect_checks_the_endpoint_before_it_spends_a_code(stack: Stack, tmp_path: Path) -> None:
    created = await wgmfa(stack, "admin", "location", "add", "nowhere", "--endpoint", "no-such-host.invalid:51820",
                          "--network", "10.32.0.0/24", "--mfa", "internal")
    assert created.returncode == 0, created.stderr
    await stack.add_user_with_totp("ivan")  # so that a start would be a login, with a code to spend
    config = tmp_path / "ivan.json"
    added = await wgmfa(stack, "admin", "device", "add", "ivan", "laptop", "--location", "nowhere", "-o", str(config))
    assert added.returncode == 0, added.stderr
    connect = await wgmfa(stack, "client", "connect", "--config", str(config), "--code", "123456",
                          "--interface", "wgmfa-tcli0")
    assert connect.returncode == 3, connect.stdout + connect.stderr
    assert "cannot connect: cannot resolve endpoint host 'no-such-host.invalid'" in connect.stderr
    # no login was started, so no code was spent
    bus = await Bus.connect(stack.nats_url, "test", wait_s=5)
    try:
        started = [e for e in await read_stream(bus, "wgmfa.events.mfa.>") if e.get("username") == "ivan"]
    finally:
        await bus.close()
    assert started == []


async def test_an_operator_offboards_a_user_and_changes_a_location(stack: Stack) -> None:
    async def ok(*args: str) -> str:
        result = await wgmfa(stack, "admin", *args)
        assert result.returncode == 0, result.stderr
        return result.stdout

    await ok("location", "add", "branch", "--endpoint", "vpn.example.com:51821", "--network", "10.31.0.0/24")
    await stack.add_user_with_totp("dan")
    await ok("device", "add", "dan", "laptop", "--location", "branch")

    shown = await ok("user", "show", "dan")
    assert "TOTP: active" in shown and "email codes: off" in shown and "not locked" in shown and "laptop" in shown

    refused = await wgmfa(stack, "admin", "totp", "reset", "dan")
    assert refused.returncode == 1
    assert "last second factor of dan" in refused.stderr and "--force" in refused.stderr
    assert "TOTP: active" in await ok("user", "show", "dan")  # nothing changed
    assert "TOTP removed" in await ok("totp", "reset", "dan", "--force")

    bad = await wgmfa(stack, "admin", "location", "set", "branch", "--allowed-ips", "192.168.1.1/24")
    assert bad.returncode == 1 and "is not a network" in bad.stderr
    changed = await ok("location", "set", "branch", "--allowed-ips", "192.168.1.0/24,10.99.0.0/16", "--keepalive", "20")
    assert "allowed_ips: [] -> ['192.168.1.0/24', '10.99.0.0/16']" in changed and "keepalive_s: 25 -> 20" in changed

    await ok("enroll", "dan", "--actor", "onboarding")
    assert "dan disabled" in await ok("user", "disable", "dan", "--actor", "hr")
    again = await wgmfa(stack, "admin", "user", "disable", "dan")
    assert (again.returncode, again.stderr.strip()) == (1, "wgmfa: user dan is already disabled")
    assert "DISABLED" in await ok("user", "show", "dan")
    assert "device laptop of dan is now old-laptop" in await ok("device", "rename", "dan", "laptop", "old-laptop")
    assert "removed from 1 location(s)" in await ok("device", "remove", "dan", "old-laptop")
    assert "deleted" in await ok("--actor", "helpdesk", "user", "delete", "dan")
    gone = await wgmfa(stack, "admin", "user", "show", "dan")
    assert (gone.returncode, gone.stderr.strip()) == (1, "wgmfa: user dan not found")

    assert await ok("sessions", "--live") == "(none)\n"  # every session of the stack is over
    watch = await wgmfa(stack, "admin", "sessions", "--watch")
    assert watch.returncode == 1 and "--watch needs --live" in watch.stderr

    events = await stack.read("wgmfa.events.>")
    actors = {e["type"]: e.get("actor") for e in events if e.get("username") == "dan" or e.get("location_name") == "branch"}
    assert actors["admin.user_deleted"] == "helpdesk"
    assert actors["enrollment.issued"] == "onboarding"
    assert actors["admin.user_disabled"] == "hr"
    assert actors["admin.location_changed"] == actors["admin.totp_reset"] == os_user()
