"""Sending email: the `Mailer` port and its SMTP adapter (a fake is in core_service.testing)."""
from __future__ import annotations

import asyncio
import smtplib
import ssl
from email.message import EmailMessage
from email.utils import formatdate, make_msgid
from typing import Protocol

from core_service.settings import CoreSettings
from runtime.errors import Unavailable


class MailError(Unavailable):
    """Raised when the mail could not be handed to the SMTP server; the message says why."""


class Mailer(Protocol):
    async def send(self, to: str, subject: str, body: str) -> None: ...


class SmtpMailer:
    def __init__(self, settings: CoreSettings) -> None:
        assert settings.smtp_host is not None
        self.settings = settings

    def _message(self, to: str, subject: str, body: str) -> EmailMessage:
        message = EmailMessage()
        message["From"] = self.settings.smtp_sender
        message["To"] = to
        message["Subject"] = subject
        message["Date"] = formatdate(localtime=False)
        message["Message-ID"] = make_msgid(domain="wgmfa")
        message.set_content(body)
        return message

    def _send(self, message: EmailMessage) -> None:
        s = self.settings
        context = ssl.create_default_context()
        smtp_class = smtplib.SMTP_SSL if s.smtp_security == "tls" else smtplib.SMTP
        kwargs = {"context": context} if s.smtp_security == "tls" else {}
        with smtp_class(s.smtp_host, s.smtp_port, timeout=s.smtp_timeout_s, **kwargs) as smtp:  # type: ignore[arg-type]
            if s.smtp_security == "starttls":
                smtp.starttls(context=context)
            if s.smtp_user:
                smtp.login(s.smtp_user, s.smtp_password.get_secret_value() if s.smtp_password else "")
            smtp.send_message(message)

    async def send(self, to: str, subject: str, body: str) -> None:
        try:
            await asyncio.to_thread(self._send, self._message(to, subject, body))
        except (OSError, smtplib.SMTPException, ssl.SSLError) as exc:
            raise MailError(f"{type(exc).__name__}: {exc}".strip(": ")) from None
