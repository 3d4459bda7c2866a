"""`wgmfa up` starts the whole system on embedded defaults and stops it cleanly."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from tests.support.stack import REPO, free_port
from wgmfa.up import interface_name, port_free


def processes_using(marker: str) -> list[int]:
    """PIDs whose command line or environment mentions `marker`."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            blob = (entry / "cmdline").read_bytes() + (entry / "environ").read_bytes()
        except OSError:
            continue
        if marker.encode() in blob:
            found.append(int(entry.name))
    return found


def up_env(state: Path) -> dict[str, str]:
    """Settings for an `up` of its own: free ports, its own state directory."""
    nats_port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("WGMFA_")}
    env.update(
        WGMFA_STATE_DIR=str(state),
        WGMFA_NATS_PORT=str(nats_port),
        WGMFA_NATS_URL=f"nats://127.0.0.1:{nats_port}",
        WGMFA_PROXY_PORT=str(free_port()),
        WGMFA_SMTP_SINK_PORT=str(free_port()),
        PYTHONUNBUFFERED="1",
    )
    return env


def wait_until(condition, what: str, timeout: float = 60.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


def start_up(tmp_path: Path, env: dict[str, str]) -> subprocess.Popen[bytes]:
    """`wgmfa up`, its output in tmp_path/up.log, once it says it is up."""
    log = open(tmp_path / "up.log", "ab")
    up = subprocess.Popen([sys.executable, "-m", "wgmfa", "up"], env=env, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
    log.close()

    def is_up() -> bool:
        assert up.poll() is None, (tmp_path / "up.log").read_text()
        return "is up" in (tmp_path / "up.log").read_text()

    wait_until(is_up, "wgmfa up")
    return up


def test_up_runs_everything_and_ctrl_c_stops_it(tmp_path: Path) -> None:
    state = tmp_path / "state"
    env = up_env(state)
    proxy_port = int(env["WGMFA_PROXY_PORT"])
    env["WGMFA_CORE_METRICS_PORT"] = str(core_metrics_port := free_port())
    interface = None
    log = open(tmp_path / "up.log", "wb")
    up = subprocess.Popen([sys.executable, "-m", "wgmfa", "up"], env=env, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 60
        while "is up" not in (tmp_path / "up.log").read_text():
            assert up.poll() is None, (tmp_path / "up.log").read_text()
            assert time.monotonic() < deadline, (tmp_path / "up.log").read_text()
            time.sleep(0.2)
        assert httpx.get(f"http://127.0.0.1:{proxy_port}/api/v1/health").json() == {"status": "ok"}
        # the banner says where the metrics are, and the core serves them there
        assert f"core http://127.0.0.1:{core_metrics_port}/metrics" in (tmp_path / "up.log").read_text()
        assert "# TYPE wgmfa_logins_total counter" in httpx.get(f"http://127.0.0.1:{core_metrics_port}/metrics").text
        wg_port = free_port()
        added = subprocess.run(
            [sys.executable, "-m", "wgmfa", "admin", "location", "add", "office", "--endpoint", f"192.0.2.1:{wg_port}",
             "--network", "10.10.0.0/24", "--json"],
            env=env, cwd=REPO, capture_output=True, text=True, timeout=30,
        )
        assert added.returncode == 0, added.stderr
        assert json.loads(added.stdout)["location"]["id"] == 1
        # emailed codes land in the local SMTP sink, kept under the state directory
        assert f"emailed codes are kept in {state / 'mail'}" in (tmp_path / "up.log").read_text()
        for command in (["user", "add", "una", "--email", "una@example.com"], ["email", "enable", "una"],
                        ["device", "add", "una", "laptop", "--location", "office", "--json"]):
            done = subprocess.run([sys.executable, "-m", "wgmfa", "admin", *command], env=env, cwd=REPO,
                                  capture_output=True, text=True, timeout=30)
            assert done.returncode == 0, done.stderr
        pubkey = json.loads(done.stdout)["pubkey"]
        started = httpx.post(f"http://127.0.0.1:{proxy_port}/api/v1/client-mfa/start",
                             json={"location_id": 1, "pubkey": pubkey, "method": 1})
        assert started.status_code == 200, started.text
        mails = list((state / "mail").glob("*.eml"))
        assert len(mails) == 1 and "Your code:" in mails[0].read_text()
        # state lives under the state directory
        assert (state / "core.db").exists() and (state / "nats" / "jetstream").is_dir()
        assert (state / "core-secret.key").stat().st_mode & 0o777 == 0o600
        # every connection authenticates: each role's NKey seed is only the owner's to read
        credentials = state / "nats-credentials"
        assert credentials.stat().st_mode & 0o777 == 0o700
        assert {p.stem for p in credentials.glob("*.nk")} >= {"core", "proxy", "reaper", "admin", "operator"}
        assert all(p.stat().st_mode & 0o777 == 0o600 for p in credentials.glob("*.nk"))
        refused = subprocess.run(
            [sys.executable, "-c", f"import asyncio, nats; asyncio.run(nats.connect('{env['WGMFA_NATS_URL']}', "
             "allow_reconnect=False, connect_timeout=3))"], capture_output=True, text=True, timeout=30)
        assert refused.returncode != 0 and "authorization" in refused.stderr.lower(), refused.stderr
        # `events tail` (the operator role) finds its key too
        tail = subprocess.run([sys.executable, "-m", "wgmfa", "events", "tail", "admin.*", "--all", "--count", "1",
                               "--json"], env=env, cwd=REPO, capture_output=True, text=True, timeout=30)
        assert tail.returncode == 0 and json.loads(tail.stdout)["type"] == "admin.location_created", tail.stderr
        assert len(processes_using(str(state))) >= 5  # nats-server, SMTP sink, core, proxy, reaper
        if os.geteuid() == 0:  # the embedded gateway comes up for the first location, on an interface of its own
            interface = interface_name(state, 1)
            deadline = time.monotonic() + 30
            while f"gateway for location office started on interface {interface}" not in (
                tmp_path / "up.log"
            ).read_text() or subprocess.run(
                ["wg", "show", interface, "listen-port"], capture_output=True, text=True
            ).stdout.strip() != str(wg_port):
                assert time.monotonic() < deadline, (tmp_path / "up.log").read_text()
                time.sleep(0.3)
        else:
            assert "gateway not started: userspace WireGuard needs root" in (tmp_path / "up.log").read_text()

        # a crashed service is restarted
        core = [pid for pid in processes_using(str(state)) if b"core_service" in Path(f"/proc/{pid}/cmdline").read_bytes()]
        os.kill(core[0], signal.SIGKILL)
        deadline = time.monotonic() + 30
        while "core exited" not in (tmp_path / "up.log").read_text() or not subprocess.run(
            [sys.executable, "-m", "wgmfa", "admin", "location", "list", "--json"], env=env, cwd=REPO, capture_output=True
        ).stdout.strip().startswith(b"["):
            assert time.monotonic() < deadline, (tmp_path / "up.log").read_text()
            time.sleep(0.5)
    finally:
        up.send_signal(signal.SIGINT)
        assert up.wait(30) == 0
        log.close()
    output = (tmp_path / "up.log").read_text()
    assert "wgmfa: stopped" in output
    time.sleep(0.5)
    assert processes_using(str(state)) == []
    if interface is not None:  # the interface it made is gone
        assert subprocess.run(["ip", "link", "show", interface], capture_output=True).returncode != 0


def test_interface_names_belong_to_their_state_directory(tmp_path: Path) -> None:
    names = {interface_name(tmp_path / d, 1) for d in ("a", "b")} | {interface_name(tmp_path / "a", 12345)}
    assert len(names) == 3 and all(len(n) <= 15 for n in names)
    assert "wgmfa1" not in names  # never the name a gateway started by hand takes by default
    assert interface_name(tmp_path / "a", 1) == interface_name(tmp_path / "a" / ".." / "a", 1)


def test_a_second_up_on_the_same_state_refuses_and_down_stops_the_first(tmp_path: Path) -> None:
    state = tmp_path / "state"
    env = up_env(state)
    up = start_up(tmp_path, env)
    try:
        second = subprocess.run([sys.executable, "-m", "wgmfa", "up"], env=up_env(state), cwd=REPO,
                                capture_output=True, text=True, timeout=60)
        assert second.returncode == 1
        assert f"wgmfa is already up on {state} (process {up.pid}); `wgmfa down` stops it" in second.stderr
        down = subprocess.run([sys.executable, "-m", "wgmfa", "down"], env=env, cwd=REPO,
                              capture_output=True, text=True, timeout=60)
        assert down.returncode == 0, down.stderr
        assert up.wait(10) == 0
        wait_until(lambda: processes_using(str(state)) == [], "every child to stop", timeout=20)
        again = subprocess.run([sys.executable, "-m", "wgmfa", "down"], env=env, cwd=REPO,
                               capture_output=True, text=True, timeout=60)
        assert again.returncode == 1 and f"wgmfa is not up on {state}" in again.stderr
    finally:
        if up.poll() is None:
            up.send_signal(signal.SIGINT)
            up.wait(30)


@pytest.mark.parametrize("how", ["hangup", "kill", "stdout closed"])
def test_no_child_outlives_up(tmp_path: Path, how: str) -> None:
    """Closing the terminal (SIGHUP), `kill -9` of up itself, or a stdout nobody reads (`wgmfa
    up | head -1`): every child stops, no port stays taken."""
    state = tmp_path / "state"
    env = up_env(state)
    if how == "stdout closed":
        up = subprocess.Popen([sys.executable, "-m", "wgmfa", "up"], env=env, cwd=REPO,
                              stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        assert up.stdout is not None
        assert b"nats-server" in up.stdout.readline()  # what `head -1` reads, then it exits
        up.stdout.close()
        wait_until(lambda: up.poll() is not None, "up to stop", timeout=90)
    else:
        up = start_up(tmp_path, env)
        assert len(processes_using(str(state))) >= 5
        up.send_signal(signal.SIGHUP if how == "hangup" else signal.SIGKILL)
        up.wait(30)
    wait_until(lambda: processes_using(str(state)) == [], "every child to stop", timeout=30)
    assert port_free("127.0.0.1", int(env["WGMFA_PROXY_PORT"])) and port_free("127.0.0.1", int(env["WGMFA_NATS_PORT"]))


def test_without_root_up_says_why_there_is_no_gateway(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    from wgmfa.up import Supervisor, UpSettings

    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    reason = Supervisor(UpSettings()).gateway_blocker()
    assert reason is not None and "needs root" in reason
