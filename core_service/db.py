"""The database: async engine, transactions, and schema migrations (Alembic)."""
from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from alembic import command
from alembic.config import Config
from sqlalchemy import Table, create_engine, event
from sqlalchemy.engine import Engine, make_url
from sqlalchemy.ext.asyncio import AsyncEngine, async_sessionmaker, create_async_engine
from sqlalchemy.orm import sessionmaker
from sqlmodel import Session
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


class Snapshot(SimpleNamespace):
    """One table's part of a row read in a transaction, under the model's attribute names.
    Read only: a change goes through a statement."""


class JoinedRead:
    """The columns of several tables for one select, each labelled `<table>__<column>`, and
    the split of its row back into a Snapshot per table (None for a table an outer join
    found no row of). For the reads every login makes: building ORM entities from a
    joined row (an instance state, a loader built per execution, every column copied in
    through the instrumentation) cost the core more CPU than the rest of the statement."""

    def __init__(self, *tables: Table) -> None:
        self.columns = [column.label(f"{table.name}__{column.key}") for table in tables for column in table.c]
        self._parts = [
            (
                [f"{table.name}__{key}" for key in table.c.keys()],
                list(table.c.keys()),
                f"{table.name}__{next(iter(table.primary_key)).key}",
            )
            for table in tables
        ]

    def split(self, row: Any) -> list[Snapshot | None]:
        values = row._mapping
        return [
            None if values[present] is None else Snapshot(**{key: values[label] for label, key in zip(labels, keys)})
            for labels, keys, present in self._parts
        ]


class InlineSession:
    """The part of sqlmodel's AsyncSession the core uses, over a synchronous Session whose
    statements run on the event loop's own thread: SQLite in WAL mode takes microseconds
    per statement, and the async adaption around each one (greenlet switches, aiosqlite's
    cursor objects and its thread hops) cost more CPU than the statements. The price: while SQLite waits for a lock another process holds, the loop
    waits too, so it is for one core process per SQLite file (whose writes are serialised
    in-process), chosen with WGMFA_SQLITE_INLINE=true."""

    def __init__(self, session: Session) -> None:
        self.sync_session = session
        self.info = session.info

    async def exec(self, statement: Any, **kwargs: Any) -> Any:
        return self.sync_session.exec(statement, **kwargs)

    async def execute(self, statement: Any, *args: Any, **kwargs: Any) -> Any:
        return self.sync_session.execute(statement, *args, **kwargs)

    async def get(self, entity: Any, ident: Any, **kwargs: Any) -> Any:
        return self.sync_session.get(entity, ident, **kwargs)

    def add(self, instance: object) -> None:
        self.sync_session.add(instance)

    async def delete(self, instance: object) -> None:
        self.sync_session.delete(instance)

    async def flush(self) -> None:
        self.sync_session.flush()

    async def refresh(self, instance: object, *args: Any, **kwargs: Any) -> None:
        self.sync_session.refresh(instance, *args, **kwargs)


def _sqlite_pragmas(dbapi_connection, _record) -> None:  # type: ignore[no-untyped-def]
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute("PRAGMA busy_timeout=30000")
    cursor.close()


class Database:
    def __init__(self, url: str, *, pool_size: int = 10, sqlite_inline: bool = False) -> None:
        self.url = url
        self.is_sqlite = url.startswith("sqlite")
        path = make_url(url).database if self.is_sqlite else None
        # one engine: a synchronous one for SQLite statements on the loop's thread
        # (InlineSession), else the async one
        self.inline_sessions: sessionmaker[Session] | None = None
        self.engine: AsyncEngine | None = None
        if self.is_sqlite and sqlite_inline and path and path != ":memory:":
            # A session never waits for a pooled connection: with statements on the loop's
            # thread, a wait would block the very loop that returns connections.
            self.sync_engine: Engine = create_engine(
                make_url(url).set(drivername="sqlite+pysqlite"), pool_size=pool_size, max_overflow=-1,
                connect_args={"timeout": SQLITE_BUSY_TIMEOUT_S, "check_same_thread": False},
            )
            self.inline_sessions = sessionmaker(self.sync_engine, class_=Session, expire_on_commit=False)
        else:
            if self.is_sqlite:
                self.engine = create_async_engine(url, connect_args={"timeout": SQLITE_BUSY_TIMEOUT_S})
            else:
                self.engine = create_async_engine(url, pool_size=pool_size, max_overflow=pool_size, pool_pre_ping=True)
            self.sync_engine = self.engine.sync_engine  # the one statements go through, for event listeners
            self.sessions = async_sessionmaker(self.engine, class_=AsyncSession, expire_on_commit=False)
        if self.is_sqlite:
            event.listen(self.sync_engine, "connect", _sqlite_pragmas)
        # SQLite has one writer; serialising write transactions in the process avoids
        # "database is locked" when a read transaction upgrades to a write.
        self._write_lock = asyncio.Lock() if self.is_sqlite else None

    @property
    def inline(self) -> bool:
        """Whether SQLite statements run on the event loop's thread."""
        return self.inline_sessions is not None

    async def migrate(self) -> None:
        await asyncio.to_thread(upgrade_schema, self.url)

    @contextlib.asynccontextmanager
    async def transaction(self) -> AsyncIterator[AsyncSession]:
        """A session in a transaction, committed on success and rolled back on error."""
        async with self._write_lock if self._write_lock is not None else contextlib.nullcontext():
            if self.inline_sessions is not None:
                with self.inline_sessions() as sync_session, sync_session.begin():
                    session = InlineSession(sync_session)
                    yield session  # type: ignore[misc]
                    for write in session.info.pop(PRE_COMMIT, {}).values():
                        await write(session)  # type: ignore[arg-type]
                return
            async with self.sessions() as session:
                async with session.begin():
                    yield session
                    for write in session.info.pop(PRE_COMMIT, {}).values():
                        await write(session)

    @contextlib.asynccontextmanager
    async def reader(self) -> AsyncIterator[AsyncSession]:
        if self.inline_sessions is not None:
            with self.inline_sessions() as sync_session:
                yield InlineSession(sync_session)  # type: ignore[misc]
            return
        async with self.sessions() as session:
            yield session

    async def close(self) -> None:
        if self.engine is not None:
            await self.engine.dispose()
        else:
            self.sync_engine.dispose()
