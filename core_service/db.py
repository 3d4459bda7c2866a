"""The database: async engine, transactions, and schema migrations (Alembic)."""
from __future__ import annotations

import asyncio
import contextlib
import sqlite3
from collections.abc import AsyncIterator, Awaitable, Callable
from functools import partial
from pathlib import Path
from typing import Any

import aiosqlite
from alembic import command
from alembic.config import Config
from sqlalchemy import event
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import async_sessionmaker, create_async_engine
from sqlmodel.ext.asyncio.session import AsyncSession

PACKAGE_DIR = Path(__file__).resolve().parent


def alembic_config(url: str) -> Config:
    config = Config(str(PACKAGE_DIR / "alembic.ini"))
    config.set_main_option("script_location", str(PACKAGE_DIR / "migrations"))
    config.attributes["database_url"] = url
    return config


def upgrade_schema(url: str) -> None:
    """Bring the schema to the newest migration. Blocking: call it from a thread."""
    command.upgrade(alembic_config(url), "head")


SQLITE_BUSY_TIMEOUT_S = 30
PRE_COMMIT = "pre_commit"  # session.info key: what `before_commit` registered


def before_commit(session: AsyncSession, key: str, write: Callable[[AsyncSession], Awaitable[None]]) -> None:
    """Have `write(session)` run once, last, inside this transaction before it commits
    (a body that raises skips it): writes a transaction gathers as it goes (its outbox
    rows) go out as one statement."""
    session.info.setdefault(PRE_COMMIT, {}).setdefault(key, write)


class _InlineSqliteConnection(aiosqlite.Connection):
    """aiosqlite, with every statement run on the event loop's own thread once connected.

    aiosqlite hands each call (cursor, execute, fetch, close: four per statement) to a
    thread and back; with SQLite in WAL mode a statement takes microseconds, so those hops
    were most of a login's CPU. The price: while SQLite waits for a lock another process
    holds, the loop waits too, so it is for one core process per SQLite file (whose writes
    are serialised in-process), chosen with WGMFA_SQLITE_INLINE=true."""

    async def _execute(self, fn, *args, **kwargs):  # type: ignore[no-untyped-def]
        if not self._running or not self._connection:
            raise ValueError("Connection closed")
        return partial(fn, *args, **kwargs)()


def _inline_sqlite_creator(path: str) -> Any:
    async def connect() -> aiosqlite.Connection:
        def connector() -> sqlite3.Connection:
            # used from the loop's thread after being opened in aiosqlite's
            return sqlite3.connect(path, timeout=SQLITE_BUSY_TIMEOUT_S, check_same_thread=False)

        connection = _InlineSqliteConnection(connector, 64)
        connection._thread.daemon = True
        return await connection

    return connect


class Database:
    def __init__(self, url: str, *, pool_size: int = 10, sqlite_inline: bool = False) -> None:
        self.url = url
        self.is_sqlite = url.startswith("sqlite")
        if self.is_sqlite:
            path = make_url(url).database
            if sqlite_inline and path and path != ":memory:":
                self.engine = create_async_engine(url, async_creator=_inline_sqlite_creator(path))
            else:
                self.engine = create_async_engine(url, connect_args={"timeout": SQLITE_BUSY_TIMEOUT_S})

            @event.listens_for(self.engine.sync_engine, "connect")
            def _sqlite_pragmas(dbapi_connection, _record) -> None:  # type: ignore[no-untyped-def]
                cursor = dbapi_connection.cursor()
                cursor.execute("PRAGMA journal_mode=WAL")
                cursor.execute("PRAGMA foreign_keys=ON")
                cursor.execute("PRAGMA busy_timeout=30000")
                cursor.close()

        else:
            self.engine = create_async_engine(url, pool_size=pool_size, max_overflow=pool_size, pool_pre_ping=True)
        self.sessions = async_sessionmaker(self.engine, class_=AsyncSession, expire_on_commit=False)
        # SQLite has one writer; serialising write transactions in the process avoids
        # "database is locked" when a read transaction upgrades to a write.
        self._write_lock = asyncio.Lock() if self.is_sqlite else None

    async def migrate(self) -> None:
        await asyncio.to_thread(upgrade_schema, self.url)

    @contextlib.asynccontextmanager
    async def transaction(self) -> AsyncIterator[AsyncSession]:
        """A session in a transaction, committed on success and rolled back on error."""
        async with self._write_lock if self._write_lock is not None else contextlib.nullcontext():
            async with self.sessions() as session:
                async with session.begin():
                    yield session
                    for write in session.info.pop(PRE_COMMIT, {}).values():
                        await write(session)

    @contextlib.asynccontextmanager
    async def reader(self) -> AsyncIterator[AsyncSession]:
        async with self.sessions() as session:
            yield session

    async def close(self) -> None:
        await self.engine.dispose()
