"""The database: engines, transactions, the login path's prepared statements, and schema
migrations (Alembic)."""
from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import sqlite3
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from alembic import command
from alembic.config import Config
from sqlalchemy import Table, create_engine, event
from sqlalchemy.engine import Connection, Dialect, Engine, make_url
from sqlalchemy.engine.result import IteratorResult, SimpleResultMetaData
from sqlalchemy.engine.row import Row
from sqlalchemy.exc import DBAPIError, DisconnectionError, MultipleResultsFound, NoResultFound
from sqlalchemy.sql.base import Executable
from sqlalchemy.ext.asyncio import AsyncEngine, async_sessionmaker, create_async_engine
from sqlalchemy.orm import sessionmaker
from sqlmodel import Session
from sqlmodel.ext.asyncio.session import AsyncSession
from sqlmodel.sql.expression import SelectOfScalar

from core_service.settings import DATABASE_POOL_SIZE

PACKAGE_DIR = Path(__file__).resolve().parent
log = logging.getLogger(__name__)


def alembic_config(url: str) -> Config:
    config = Config(str(PACKAGE_DIR / "alembic.ini"))
    config.set_main_option("script_location", str(PACKAGE_DIR / "migrations"))
    config.attributes["database_url"] = url
    return config


def upgrade_schema(url: str) -> None:
    """Bring the schema to the newest migration. Blocking: call it from a thread."""
    command.upgrade(alembic_config(url), "head")


SQLITE_BUSY_TIMEOUT_S = 30
# A pooled PostgreSQL connection is pinged before use only after it sat idle this long;
# one the server closed (a restart) is replaced without a ping.
PING_AFTER_IDLE_S = 1.0
_IDLE_SINCE = "wgmfa_idle_since"  # a pooled connection's record: when it was last checked in
_JOINED = "wgmfa_joined"  # the SAVEPOINT of a transaction that joins a group commit
PRE_COMMIT = "pre_commit"  # session.info key: what `before_commit` registered


class NotCommitted(Exception):
    """A write transaction whose block succeeded was not committed: the COMMIT of its group
    failed, or the connection failed under another transaction of the group first."""


def before_commit(session: AsyncSession, key: str, write: Callable[[AsyncSession], Awaitable[None]]) -> None:
    """Have `write(session)` run once, last, inside this transaction before it commits
    (a body that raises skips it): writes a transaction gathers as it goes (its outbox
    rows) go out as one statement."""
    session.info.setdefault(PRE_COMMIT, {}).setdefault(key, write)


class Snapshot(SimpleNamespace):
    """One table's row as plain values under the model's attribute names: a row read in a
    transaction (read only: a change goes through a statement), or a new row before its
    INSERT."""


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


PREPARED = "wgmfa_prepared"  # the execution option that marks a `prepared` statement
_GIVEN = object()  # a parameter slot the caller's params fill
_MAX_PREPARED_ROWS = 64  # a longer multi-row INSERT goes through SQLAlchemy (its batching)
_NUMBERED = re.compile(r"\$(\d+)")  # asyncpg's placeholders


def prepared(statement: Any) -> Any:
    """Mark a statement built once at import that every login runs. On SQLite's inline
    connection (InlineSession) and on PostgreSQL (PostgresSession) it is compiled once and
    each execution goes straight to the driver, with SQLAlchemy's own type conversions;
    on aiosqlite SQLAlchemy runs it as usual. Per execution, SQLAlchemy's general path
    (cache key, execution context, parameter construction, result metadata) cost several
    times what SQLite takes to run a small statement."""
    return statement.execution_options(**{PREPARED: True})


class _Statement:
    """A marked statement compiled for one dialect: its SQL with every literal list
    expanded, a slot per positional parameter (a fixed value, or a name the caller gives,
    with its bind processor), and the result's keys and per-column result processors."""

    def __init__(self, statement: Any, dialect: Dialect, keys: list[str] | None, *, many: bool) -> None:
        compiled = statement.compile(dialect=dialect, column_keys=keys, for_executemany=many)
        given = {name for name, bind in compiled.binds.items() if bind.required}
        if any(compiled.binds[name].expanding for name in given):
            raise _NotPreparable  # a list the caller gives: its SQL differs per call
        if getattr(compiled, "insert_prefetch", None) or getattr(compiled, "update_prefetch", None):
            raise _NotPreparable  # a column default SQLAlchemy computes per execution
        expanded = compiled._process_parameters_for_postcompile(
            compiled.construct_params({name: None for name in given}, _check=False)
        )
        processors = {**compiled._bind_processors, **(expanded.processors or {})}
        self.sql: str = expanded.statement
        # per positional parameter: (name, its bind processor, _GIVEN) for a value the caller
        # gives, (name, None, the value processed) for one fixed in the statement
        self.slots: list[tuple[str, Callable[[Any], Any] | None, Any]] = []
        for name in expanded.positiontup or ():
            processor = processors.get(name)
            if name in given:
                self.slots.append((name, processor, _GIVEN))
            else:
                value = expanded.parameters[name]
                self.slots.append((name, None, processor(value) if processor is not None else value))
        columns = compiled._result_columns
        self.returns_rows = bool(columns)
        self.metadata = SimpleResultMetaData([column.keyname for column in columns])
        # per column, SQLAlchemy's result processor or None; applied as each Row is made
        result_processors = [column.type._cached_result_processor(dialect, None) for column in columns]
        self.result_processors = result_processors if any(result_processors) else None
        # a multi-row INSERT repeats its VALUES group once per row: as it is with `?`
        # placeholders (SQLite), renumbered per row with `$n` ones (asyncpg). Only where the
        # group holds every parameter of the statement: each row's values follow the last's.
        many_values = compiled._insertmanyvalues if many else None
        self.values_group: str | None = None
        self.numbered = dialect.paramstyle == "numeric_dollar"
        if (
            many_values is not None
            and dialect.paramstyle in ("qmark", "numeric_dollar")
            and many_values.num_positional_params_counted == len(self.slots)
        ):
            self.values_group = f"({many_values.single_values_expr})"
        self._many_sql: dict[int, str] = {}  # a multi-row INSERT's SQL, per number of rows

    def parameters(self, params: dict[str, Any]) -> list[Any]:
        values = []
        for name, processor, value in self.slots:
            if value is _GIVEN:
                value = params[name]
                if processor is not None:
                    value = processor(value)
            values.append(value)
        return values

    def result(self, raw_rows: list[Any], rowcount: int) -> PreparedResult:
        """The driver's rows as SQLAlchemy's Rows, converted as SQLAlchemy converts them."""
        metadata, processors, key_to_index = self.metadata, self.result_processors, self.metadata._key_to_index
        return PreparedResult(
            metadata, [Row(metadata, processors, key_to_index, tuple(raw)) for raw in raw_rows], rowcount
        )

    def statement_for(self, params: Any) -> tuple[str, list[Any]]:
        """The SQL and positional values for one execution: `params` a dict, or a list of
        dicts for a multi-row INSERT."""
        if not isinstance(params, list):
            return self.sql, self.parameters(params or {})
        sql = self._many_sql.get(len(params))
        if sql is None:
            sql = self._many_sql[len(params)] = self._for_rows(len(params))
        return sql, [value for row in params for value in self.parameters(row)]

    def _for_rows(self, rows: int) -> str:
        group = self.values_group
        assert group is not None
        if self.numbered:
            width = len(self.slots)
            groups = [_NUMBERED.sub(lambda n: f"${int(n.group(1)) + row * width}", group) for row in range(rows)]
        else:
            groups = [group] * rows
        return self.sql.replace(group, ", ".join(groups), 1)


class PreparedResult:
    """A prepared statement's result: SQLAlchemy's Rows, with the part of its Result's API
    the login path uses done on the list of rows; anything else is asked of SQLAlchemy's
    own result over the same rows. Setting up an IteratorResult and its ScalarResult for
    each statement (metadata reductions, row getters) was a twentieth of the core's CPU
    per login, more than running the statement."""

    __slots__ = ("_metadata", "_rows", "rowcount")

    def __init__(self, metadata: SimpleResultMetaData, rows: list[Row[Any]], rowcount: int) -> None:
        self._metadata = metadata
        self._rows = rows
        self.rowcount = rowcount

    def __iter__(self) -> Iterator[Row[Any]]:
        return iter(self._rows)

    def all(self) -> list[Row[Any]]:
        return list(self._rows)

    def first(self) -> Row[Any] | None:
        return self._rows[0] if self._rows else None

    def one(self) -> Row[Any]:
        if len(self._rows) != 1:
            raise NoResultFound("No row was found when one was required") if not self._rows else MultipleResultsFound(
                "Multiple rows were found when exactly one was required"
            )
        return self._rows[0]

    def scalar_one(self) -> Any:
        return self.one()[0]

    def scalars(self) -> PreparedResult:
        """The first column of each row (as plain values, the way ScalarResult gives them)."""
        return _Scalars(self._metadata, [row[0] for row in self._rows], self.rowcount)

    def __getattr__(self, name: str) -> Any:
        result = IteratorResult(self._metadata, iter(self._rows))
        result.rowcount = self.rowcount  # type: ignore[attr-defined]
        return getattr(result, name)


class _Scalars(PreparedResult):
    """PreparedResult.scalars(): values, not rows."""

    __slots__ = ()

    def scalar_one(self) -> Any:
        return self.one()

    def scalars(self) -> PreparedResult:
        return self

    def __getattr__(self, name: str) -> Any:
        return getattr(IteratorResult(SimpleResultMetaData(["value"]), iter([(value,) for value in self._rows])).scalars(), name)


class _NotPreparable(Exception):
    """The statement runs through SQLAlchemy after all."""


def _compiled_for(
    cache: dict[Any, _Statement | None], statement: Any, params: Any, dialect: Dialect
) -> _Statement | None:
    """A marked statement compiled for `dialect` (once; cached), or None when SQLAlchemy
    must run it: not marked, a list the caller gives, a column default computed per
    execution, too many rows, or a SQLAlchemy whose compiler no longer offers what
    `_Statement` reads."""
    if not (isinstance(statement, Executable) and statement._execution_options.get(PREPARED)):
        return None
    rows = params if isinstance(params, list) else None
    if rows is not None and not 0 < len(rows) <= _MAX_PREPARED_ROWS:
        return None
    # an INSERT's SQL names the columns its values give
    keys = sorted(rows[0] if rows else params or ()) if statement.is_insert else None
    key = (statement, tuple(keys), rows is not None) if keys is not None else statement
    if key not in cache:
        try:
            cache[key] = _Statement(statement, dialect, keys, many=rows is not None)
        except _NotPreparable:
            cache[key] = None
        except Exception:  # noqa: BLE001 - SQLAlchemy's own path still works
            log.warning("running a prepared statement through SQLAlchemy: it cannot be compiled here", exc_info=True)
            cache[key] = None
    compiled = cache[key]
    if compiled is None or (rows is not None and compiled.values_group is None):
        return None
    return compiled


def _announce(connection: Connection, cursor: Any, sql: str, values: list[Any]) -> None:
    """Show `before_cursor_execute` listeners a statement that runs past SQLAlchemy's
    execution (a prepared one, a group commit's SAVEPOINT), as SQLAlchemy shows its own."""
    for listener in connection.dispatch.before_cursor_execute:
        listener(connection, cursor, sql, values, None, False)


def _on_driver(connection: Connection, sql: str, values: list[Any], *, fetch: bool) -> tuple[list[Any], int]:
    """One statement on `connection`'s SQLite driver cursor, its rows (when `fetch`) and
    row count; seen by `before_cursor_execute` listeners, errors raised as SQLAlchemy's."""
    cursor = connection.connection.dbapi_connection.cursor()
    _announce(connection, cursor, sql, values)
    try:
        cursor.execute(sql, values)
        # every row now: a statement left unfinished would stay open in the transaction
        return (cursor.fetchall() if fetch else []), cursor.rowcount
    except sqlite3.Error as error:
        raise DBAPIError.instance(sql, values, error, sqlite3.Error) from error
    finally:
        cursor.close()


class InlineSession:
    """The part of sqlmodel's AsyncSession the core uses, over a synchronous connection
    whose statements run on the event loop's own thread: SQLite in WAL mode takes
    microseconds per statement, and the async adaption around each one (greenlet switches,
    aiosqlite's cursor objects and its thread hops) cost more CPU than the statements. The
    price: while SQLite waits for a lock another process holds, the loop waits too, so it
    is for one core process per SQLite file (whose writes are serialised in-process),
    chosen with WGMFA_SQLITE_INLINE=true. Statements marked `prepared` run on the
    connection's driver cursor; the rest go through a synchronous ORM session, made only
    once something asks for it (a login never does) and joined to the same transaction."""

    def __init__(self, connection: Connection, sessions: sessionmaker[Session], compiled: dict[Any, _Statement | None]) -> None:
        self._connection = connection
        self._sessions = sessions
        self._orm: Session | None = None
        self._compiled = compiled
        self.info: dict[Any, Any] = {}

    @property
    def sync_session(self) -> Session:
        """The ORM session, in this connection's transaction (which it never commits)."""
        if self._orm is None:
            self._orm = self._sessions(bind=self._connection)
        return self._orm

    def close(self, *, flush: bool) -> None:
        """Let go of the ORM session's objects (they keep their loaded values), after
        writing what it holds when `flush`."""
        if self._orm is not None:
            try:
                if flush:
                    self._orm.flush()
            finally:
                self._orm.close()
                self._orm = None

    async def exec(self, statement: Any, *, params: Any = None, **kwargs: Any) -> Any:
        compiled = None if kwargs else _compiled_for(self._compiled, statement, params, self._connection.dialect)
        if compiled is None:
            return self.sync_session.exec(statement, params=params, **kwargs)
        result = self._run(compiled, params)
        return result.scalars() if isinstance(statement, SelectOfScalar) else result  # as sqlmodel's exec

    async def execute(self, statement: Any, params: Any = None, **kwargs: Any) -> Any:
        compiled = None if kwargs else _compiled_for(self._compiled, statement, params, self._connection.dialect)
        if compiled is None:
            return self.sync_session.execute(statement, params, **kwargs)
        return self._run(compiled, params)

    def _run(self, compiled: _Statement, params: Any) -> PreparedResult:
        """A marked statement on the driver connection, in this transaction."""
        if self._orm is not None and self._orm.autoflush:
            self._orm.flush()  # pending ORM changes first, as the session's own execute does
        sql, values = compiled.statement_for(params)
        raw_rows, rowcount = _on_driver(self._connection, sql, values, fetch=compiled.returns_rows)
        return compiled.result(raw_rows, rowcount)

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


_STATUS_COUNT = re.compile(r"(?:SELECT|UPDATE|DELETE|INSERT \d+) (\d+)")


class PostgresSession:
    """sqlmodel's AsyncSession on PostgreSQL (asyncpg), with statements marked `prepared`
    run on the asyncpg connection of its transaction, as SQLAlchemy's own asyncpg adapter
    runs them (its lock, its transaction, its prepared-statement cache and its error
    translation) without a greenlet switch and SQLAlchemy's general execution path around
    each. Everything else is the AsyncSession's."""

    def __init__(self, session: AsyncSession, dialect: Dialect, compiled: dict[Any, _Statement | None]) -> None:
        self._session = session
        self._dialect = dialect
        self._compiled = compiled
        self._connection: Connection | None = None  # the transaction's, once a marked statement ran
        self._adapted: Any = None  # its asyncpg connection, as SQLAlchemy adapts it

    def __getattr__(self, name: str) -> Any:
        return getattr(self._session, name)

    async def exec(self, statement: Any, *, params: Any = None, **kwargs: Any) -> Any:
        compiled = None if kwargs else _compiled_for(self._compiled, statement, params, self._dialect)
        if compiled is None:
            return await self._session.exec(statement, params=params, **kwargs)
        result = await self._run(compiled, params)
        return result.scalars() if isinstance(statement, SelectOfScalar) else result  # as sqlmodel's exec

    async def execute(self, statement: Any, params: Any = None, **kwargs: Any) -> Any:
        compiled = None if kwargs else _compiled_for(self._compiled, statement, params, self._dialect)
        if compiled is None:
            return await self._session.execute(statement, params, **kwargs)
        return await self._run(compiled, params)

    async def _run(self, compiled: _Statement, params: Any) -> PreparedResult:
        orm = self._session.sync_session
        if orm.autoflush and (orm.new or orm.dirty or orm.deleted):
            await self._session.flush()  # pending ORM changes first, as the session's own execute does
        if self._adapted is None:
            connection = await self._session.connection()
            self._connection = connection.sync_connection
            self._adapted = (await connection.get_raw_connection()).dbapi_connection
        assert self._connection is not None
        adapted = self._adapted
        sql, values = compiled.statement_for(params)
        _announce(self._connection, None, sql, values)
        async with adapted._execute_mutex:
            try:
                if adapted._transaction is None:
                    await adapted._start_transaction()
                prepared_statement, _ = await adapted._prepare(sql, self._dialect._invalidate_schema_cache_asof)
                records = await prepared_statement.fetch(*values)
                status = prepared_statement.get_statusmsg()
            except Exception as error:
                try:
                    adapted._handle_exception(error)  # raises it as the adapted DBAPI's error
                except Exception as translated:
                    raise DBAPIError.instance(sql, values, translated, self._dialect.loaded_dbapi.Error) from error
                raise
        counted = _STATUS_COUNT.match(status or "")
        return compiled.result(records, int(counted.group(1)) if counted else -1)


def _replace_dead_connections(engine: Engine) -> None:
    """Check a pooled PostgreSQL connection before handing it out, in place of the pool's
    pre-ping, which costs three round trips (a transaction, a `;`, a rollback) on every
    checkout: a connection the server closed (a restart or a terminated backend, seen
    by asyncpg when the socket closed) is replaced at no cost, and one that sat idle for
    longer than PING_AFTER_IDLE_S (where a dead peer may have gone unnoticed) is pinged
    first. Under load connections come back within milliseconds and are not pinged."""
    dialect = engine.dialect

    @event.listens_for(engine, "checkin")
    def idle_from_now(_dbapi_connection, record) -> None:  # type: ignore[no-untyped-def]
        record.info[_IDLE_SINCE] = time.monotonic()

    @event.listens_for(engine, "checkout")
    def alive(dbapi_connection, record, _proxy) -> None:  # type: ignore[no-untyped-def]
        if dbapi_connection.driver_connection.is_closed():
            raise DisconnectionError("the database closed this connection")
        idle_since = record.info.get(_IDLE_SINCE)
        if idle_since is None or time.monotonic() - idle_since <= PING_AFTER_IDLE_S:
            return  # new, or just back in the pool
        try:
            dialect.do_ping(dbapi_connection)
        except dialect.loaded_dbapi.Error as error:  # whatever it met: the pool tries a new connection
            raise DisconnectionError(f"the ping of an idle connection failed: {error}") from error


def _sqlite_pragmas(dbapi_connection, _record) -> None:  # type: ignore[no-untyped-def]
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute("PRAGMA busy_timeout=30000")
    cursor.close()


class Database:
    def __init__(self, url: str, *, pool_size: int = DATABASE_POOL_SIZE, sqlite_inline: bool = False) -> None:
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
                self.engine = create_async_engine(url, pool_size=pool_size, max_overflow=pool_size)
                _replace_dead_connections(self.engine.sync_engine)
            self.sync_engine = self.engine.sync_engine  # the one statements go through, for event listeners
            self.sessions = async_sessionmaker(self.engine, class_=AsyncSession, expire_on_commit=False)
        if self.is_sqlite:
            event.listen(self.sync_engine, "connect", _sqlite_pragmas)
        # SQLite has one writer; serialising write transactions in the process avoids
        # "database is locked" when a read transaction upgrades to a write.
        self._write_lock = asyncio.Lock() if self.is_sqlite else None
        self._prepared: dict[Any, _Statement | None] = {}  # `prepared` statements, compiled per statement
        self._writer: Connection | None = None  # the inline mode's connection for write transactions
        self._group: list[asyncio.Future[None]] | None = None  # transactions waiting for the next commit
        self._committer: asyncio.Future[None] | None = None

    @property
    def inline(self) -> bool:
        """Whether SQLite statements run on the event loop's thread."""
        return self.inline_sessions is not None

    async def migrate(self) -> None:
        await asyncio.to_thread(upgrade_schema, self.url)

    @contextlib.asynccontextmanager
    async def transaction(self) -> AsyncIterator[AsyncSession]:
        """A session in a transaction, committed on success and rolled back on error; when
        the block is left without an error, its writes are committed (durably, as the
        database's settings make commits)."""
        if self.inline_sessions is not None:
            async with self._inline_transaction() as session:
                yield session  # type: ignore[misc]
            return
        async with self._write_lock if self._write_lock is not None else contextlib.nullcontext():
            async with self.sessions() as async_session:
                async with async_session.begin():
                    session = self._wrapped(async_session)
                    yield session
                    for write in session.info.pop(PRE_COMMIT, {}).values():
                        await write(session)

    @contextlib.asynccontextmanager
    async def _inline_transaction(self) -> AsyncIterator[InlineSession]:
        """A write transaction on the one connection kept for them, committed together with
        the write transactions that run while its commit waits (group commit).

        The write lock makes them one at a time on that connection, and a connection (and
        ORM session) per transaction, checked out of the pool and back, cost a login more
        CPU than its statements. A COMMIT in WAL mode with synchronous=FULL waits for the
        disk (about 0.2 ms here), on the event loop's thread: a login's three commits were
        a seventh of the loop's time. So a transaction that wrote something leaves its
        changes in SQLite's open transaction and waits for a commit that runs one loop turn
        later, after the transactions that were ready to run then: one COMMIT, one fsync,
        for all of them. A transaction that joins writes under a SAVEPOINT, so that its
        failure takes back its own writes only. Nothing is weaker than a COMMIT each: no
        caller goes on before its writes are on disk, and a COMMIT that fails fails every
        transaction of its group (none of them is committed)."""
        assert self.inline_sessions is not None and self._write_lock is not None
        committed: asyncio.Future[None] | None = None
        async with self._write_lock:
            if self._writer is None:
                self._writer = self.sync_engine.connect()
            connection = self._writer
            driver = connection.connection.dbapi_connection
            joins = driver.in_transaction  # the writes of earlier transactions wait for their commit in it
            if not connection.in_transaction():
                connection.begin()
            if joins:
                _on_driver(connection, f"SAVEPOINT {_JOINED}", [], fetch=False)
            session = InlineSession(connection, self.inline_sessions, self._prepared)
            try:
                yield session
                for write in session.info.pop(PRE_COMMIT, {}).values():
                    await write(session)  # type: ignore[arg-type]
                session.close(flush=True)
                if joins:
                    _on_driver(connection, f"RELEASE {_JOINED}", [], fetch=False)
            except BaseException:
                session.close(flush=False)
                self._take_back(connection, joins)
                raise
            if driver.in_transaction:
                committed = self._commit_later()
            elif self._group is None:
                connection.commit()  # it wrote nothing, and nothing waits: no SQL
        if committed is not None:
            await committed

    def _take_back(self, connection: Connection, joined: bool) -> None:
        """Undo a failed transaction's writes: back to its SAVEPOINT when it joined a group,
        else the whole (its own) transaction. A connection SQLite left in another state
        (an error that rolled everything back, a failed undo) is not used again, and the
        group waiting on it fails."""
        try:
            driver = connection.connection.dbapi_connection
            if joined:
                _on_driver(connection, f"ROLLBACK TO {_JOINED}", [], fetch=False)
                _on_driver(connection, f"RELEASE {_JOINED}", [], fetch=False)
                intact = driver.in_transaction
            else:
                connection.rollback()
                intact = not driver.in_transaction
        except Exception:
            intact = False
        if not intact:
            group, self._group = self._group, None
            self._drop_writer(connection, group, "its connection failed under another transaction of its group")

    def _drop_writer(self, connection: Connection, group: list[asyncio.Future[None]] | None, reason: str) -> None:
        """Fail the transactions of `group`, waiting for their commit on `connection`, and
        let the connection go (what it did not commit goes with it)."""
        for waiter in group or ():
            if not waiter.done():
                waiter.set_exception(NotCommitted(reason))
        self._writer = None
        with contextlib.suppress(Exception):
            connection.invalidate()

    def _commit_later(self) -> asyncio.Future[None]:
        """A future that the group's commit resolves; the first to wait starts the group."""
        if self._group is None:
            self._group = []
            self._committer = asyncio.ensure_future(self._commit_group(self._group))
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._group.append(waiter)
        return waiter

    async def _commit_group(self, group: list[asyncio.Future[None]]) -> None:
        await asyncio.sleep(0)  # one loop turn: the transactions ready to run now join
        assert self._write_lock is not None
        async with self._write_lock:  # after those already waiting for it
            if self._group is not group:
                return  # failed already (`_drop_writer`)
            self._group = None
            connection = self._writer
            assert connection is not None
            try:
                connection.commit()
            except BaseException as error:
                log.error("a COMMIT failed; %s transactions are not committed: %s", len(group), error)
                self._drop_writer(connection, group, f"its COMMIT failed: {error}")
                if not isinstance(error, Exception):
                    raise
                return
            for waiter in group:
                if not waiter.done():
                    waiter.set_result(None)

    @contextlib.asynccontextmanager
    async def reader(self) -> AsyncIterator[AsyncSession]:
        if self.inline_sessions is not None:
            with self.sync_engine.connect() as connection:
                session = InlineSession(connection, self.inline_sessions, self._prepared)
                try:
                    yield session  # type: ignore[misc]
                finally:
                    session.close(flush=False)
            return
        async with self.sessions() as session:
            yield self._wrapped(session)

    def _wrapped(self, session: AsyncSession) -> AsyncSession:
        """On PostgreSQL, the session with its marked statements on asyncpg directly."""
        if self.engine is not None and self.engine.dialect.driver == "asyncpg":
            return PostgresSession(session, self.engine.dialect, self._prepared)  # type: ignore[return-value]
        return session

    async def close(self) -> None:
        if self._committer is not None:
            await asyncio.wait([self._committer])  # what waits for a commit gets it
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        if self.engine is not None:
            await self.engine.dispose()
        else:
            self.sync_engine.dispose()
