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

from tests.support.stack import REPO, free_port


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


def test_up_runs_everything_and_ctrl_c_stops_it(tmp_path: Path) -> None:
    state = tmp_path / "state"
    nats_port, proxy_port = free_port(), free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("WGMFA_")}
    env.update(
        WGMFA_STATE_DIR=str(state),
        WGMFA_NATS_PORT=str(nats_port),
        WGMFA_NATS_URL=f"nats://127.0.0.1:{nats_port}",
        WGMFA_PROXY_PORT=str(proxy_port),
        WGMFA_SMTP_SINK_PORT=str(free_port()),
        PYTHONUNBUFFERED="1",
    )
    log = open(tmp_path / "up.log", "wb")
    up = subprocess.Popen([sys.executable, "-m", "wgmfa", "up"], env=env, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 60
        while "is up" not in (tmp_path / "up.log").read_text():
            assert up.poll() is None, (tmp_path / "up.log").read_text()
            assert time.monotonic() < deadline, (tmp_path / "up.log").read_text()
            time.sleep(0.2)
        assert httpx.get(f"http://127.0.0.1:{proxy_port}/api/v1/health").json() == {"status": "ok"}
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
            [sys.executable, "-c", f"import asyncio, nats; asyncio.run(nats.connect('nats://127.0.0.1:{nats_port}', "
             "allow_reconnect=False, connect_timeout=3))"], capture_output=True, text=True, timeout=30)
        assert refused.returncode != 0 and "authorization" in refused.stderr.lower(), refused.stderr
        # `events tail` (the operator role) finds its key too
        tail = subprocess.run([sys.executable, "-m", "wgmfa", "events", "tail", "admin.*", "--all", "--count", "1",
                               "--json"], env=env, cwd=REPO, capture_output=True, text=True, timeout=30)
        assert tail.returncode == 0 and json.loads(tail.stdout)["type"] == "admin.location_created", tail.stderr
        assert len(processes_using(str(state))) >= 5  # nats-server, SMTP sink, core, proxy, reaper
        if os.geteuid() == 0:  # the embedded gateway comes up for the first location
            deadline = time.monotonic() + 30
            while "gateway for location office started" not in (tmp_path / "up.log").read_text() or subprocess.run(
                ["wg", "show", "wgmfa1", "listen-port"], capture_output=True, text=True
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
    assert subprocess.run(["ip", "link", "show", "wgmfa1"], capture_output=True).returncode != 0  # interface gone


def test_without_root_up_says_why_there_is_no_gateway(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    from wgmfa.up import Supervisor, UpSettings

    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    reason = Supervisor(UpSettings()).gateway_blocker()
    assert reason is not None and "needs root" in reason
