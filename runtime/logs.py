"""Log set-up shared by every process: one line per record, `key=value` extras.

Log lines never carry secrets: callers log ids, never codes, tokens or keys; as a last
line of defence the formatter masks anything that looks like a 32-byte base64 key and the
values of secret-bearing query parameters (a server's request line: `?token=…`).
"""
from __future__ import annotations

import logging
import re
import sys
from datetime import datetime, timezone

_KEY_LIKE = re.compile(r"(?<![A-Za-z0-9+/])[A-Za-z0-9+/]{43}=(?![A-Za-z0-9+/=])")
# query parameters that carry secrets, as servers log request lines with them
_SECRET_QUERY = re.compile(r"([?&](?:token|code|state|secret|password)=)[^&\s\"']+", re.I)


def scrub(text: str) -> str:
    return _SECRET_QUERY.sub(r"\1[redacted]", _KEY_LIKE.sub("[key]", text))


class _Formatter(logging.Formatter):
    def __init__(self, service: str) -> None:
        super().__init__()
        self.service = service

    def format(self, record: logging.LogRecord) -> str:
        stamp = datetime.fromtimestamp(record.created, timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3]
        line = f"{stamp}Z {record.levelname:<7} {self.service} {record.name}: {scrub(record.getMessage())}"
        if record.exc_info:
            line += "\n" + scrub(self.formatException(record.exc_info))
        return line


def configure_logging(service: str, level: str = "INFO") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_Formatter(service))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    for noisy in ("nats", "uvicorn.access", "asyncio", "aiosqlite", "sqlalchemy.engine"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, root.level))
