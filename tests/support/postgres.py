"""A throwaway PostgreSQL cluster on a free port, from Debian's server binaries.

initdb refuses to run as root, so as root the cluster belongs to the `postgres` user
that Debian's package creates.
"""
from __future__ import annotations

import glob
import os
import pwd
import shutil
import socket
import subprocess
from pathlib import Path


class PostgresUnavailable(RuntimeError):
    pass


def _bin_dir() -> Path:
    candidates = sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"), key=lambda p: int(p.split("/")[4]))
    if candidates:
        return Path(candidates[-1]).parent
    found = shutil.which("pg_ctl")
    if found:
        return Path(found).resolve().parent
    raise PostgresUnavailable("PostgreSQL server binaries not found (Debian package postgresql)")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class PostgresCluster:
    def __init__(self, base_dir: Path, *, durable: bool = False) -> None:
        """A throwaway cluster. Tests run it without fsync (what they check does not
        depend on a power cut); `durable` keeps PostgreSQL's default, a commit on disk
        before it returns, for benchmarks, which compare it with SQLite's and JetStream's
        synced writes."""
        self.base_dir = Path(base_dir)
        self.durable = durable
        self.data_dir = self.base_dir / "data"
        self.bin_dir = _bin_dir()
        self.port = 0
        self._as_postgres = os.geteuid() == 0

    def _run(self, *args: str) -> str:
        command = [str(self.bin_dir / args[0]), *args[1:]]
        if self._as_postgres:
            command = ["runuser", "-u", "postgres", "--", *command]
        result = subprocess.run(command, capture_output=True, text=True, cwd=self.base_dir)
        if result.returncode != 0:
            raise PostgresUnavailable(f"{args[0]} failed: {result.stderr.strip() or result.stdout.strip()}")
        return result.stdout

    def start(self) -> None:
        self.base_dir.mkdir(parents=True, exist_ok=True)
        if self._as_postgres:
            try:
                entry = pwd.getpwnam("postgres")
            except KeyError:
                raise PostgresUnavailable("running as root but there is no postgres user") from None
            for path in [self.base_dir, *self.base_dir.parents]:
                if path == Path("/"):
                    break
                os.chmod(path, os.stat(path).st_mode | 0o011)  # let postgres traverse
            os.chown(self.base_dir, entry.pw_uid, entry.pw_gid)
        self._run("initdb", "-D", str(self.data_dir), "-U", "wgmfa", "--auth=trust", "-E", "UTF8", "--no-sync")
        self.port = free_port()
        options = f"-p {self.port} -k {self.base_dir} -c listen_addresses=127.0.0.1 -c max_connections=200"
        if not self.durable:
            options += " -c fsync=off"
        self._run("pg_ctl", "-D", str(self.data_dir), "-o", options, "-l", str(self.base_dir / "postgres.log"), "-w", "start")

    def postmaster_pid(self) -> int:
        """The server's first process; its backends are its children."""
        return int((self.data_dir / "postmaster.pid").read_text().split("\n", 1)[0])

    def setting(self, name: str) -> str:
        """A server setting as it is in effect (SHOW)."""
        return self._run("psql", "-h", "127.0.0.1", "-p", str(self.port), "-U", "wgmfa", "-d", "postgres", "-Atc",
                         f"SHOW {name}").strip()

    def create_database(self, name: str) -> str:
        self._run("createdb", "-h", "127.0.0.1", "-p", str(self.port), "-U", "wgmfa", name)
        return self.url(name)

    def url(self, database: str) -> str:
        return f"postgresql+asyncpg://wgmfa@127.0.0.1:{self.port}/{database}"

    def stop(self) -> None:
        if self.port:
            try:
                self._run("pg_ctl", "-D", str(self.data_dir), "-m", "immediate", "-w", "stop")
            except PostgresUnavailable:
                pass
