"""A local SMTP server that keeps every mail as a file, for `wgmfa up` (so that emailed
codes can be read without a mail system) and for the tests.

    python -m wgmfa.smtp_sink --dir .wgmfa/mail --port 2525
"""
from __future__ import annotations

import argparse
import signal
import socket
import threading
import time
from dataclasses import dataclass, field
from email import message_from_bytes, policy
from email.message import EmailMessage
from pathlib import Path

from aiosmtpd.controller import Controller


@dataclass
class ReceivedMail:
    to: list[str]
    subject: str
    body: str
    path: Path | None


@dataclass
class _Handler:
    directory: Path | None
    announce: bool
    received: list[ReceivedMail] = field(default_factory=list)
    arrived: threading.Condition = field(default_factory=threading.Condition)

    async def handle_DATA(self, _server, _session, envelope) -> str:  # type: ignore[no-untyped-def]
        message: EmailMessage = message_from_bytes(envelope.original_content, policy=policy.default)  # type: ignore[assignment]
        body = message.get_body(preferencelist=("plain",))
        path = None
        if self.directory is not None:
            path = self.directory / f"{time.strftime('%Y%m%d-%H%M%S')}-{len(self.received) + 1:04d}.eml"
            path.write_bytes(envelope.original_content)
            path.chmod(0o600)
        mail = ReceivedMail(
            to=list(envelope.rcpt_tos), subject=str(message["Subject"]), body=body.get_content() if body else "", path=path
        )
        with self.arrived:
            self.received.append(mail)
            self.arrived.notify_all()
        if self.announce:
            print(f"mail for {', '.join(mail.to)}: \"{mail.subject}\" -> {path}", flush=True)
        return "250 Message accepted for delivery"


class MailSink:
    def __init__(self, directory: Path | None = None, host: str = "127.0.0.1", port: int = 0, *, announce: bool = False) -> None:
        if directory is not None:
            directory.mkdir(parents=True, exist_ok=True)
            directory.chmod(0o700)
        self.handler = _Handler(directory, announce)
        self.controller = Controller(self.handler, hostname=host, port=port or _free_port(host))
        self.host, self.port = host, self.controller.port

    def start(self) -> "MailSink":
        self.controller.start()
        return self

    def stop(self) -> None:
        self.controller.stop()

    @property
    def received(self) -> list[ReceivedMail]:
        return list(self.handler.received)

    def wait_for(self, count: int, timeout: float = 60.0) -> list[ReceivedMail]:
        """Block until `count` mails arrived in total; returns them all."""
        with self.handler.arrived:
            if not self.handler.arrived.wait_for(lambda: len(self.handler.received) >= count, timeout):
                raise TimeoutError(f"{len(self.handler.received)} of {count} mails arrived within {timeout:g} s")
            return list(self.handler.received)


def _free_port(host: str) -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m wgmfa.smtp_sink", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dir", type=Path, required=True, help="where to keep the mails (.eml files)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=2525)
    args = parser.parse_args()
    sink = MailSink(args.dir, args.host, args.port, announce=True).start()
    print(f"SMTP sink on {args.host}:{sink.port}, keeping mails in {args.dir}", flush=True)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    stop.wait()
    sink.stop()


if __name__ == "__main__":
    main()
