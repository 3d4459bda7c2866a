"""Prepared statements (core_service.db.prepared), run on the driver connection (SQLite's
in the inline mode, asyncpg's on PostgreSQL): they must give what SQLAlchemy's own
execution gives, in the same transaction, with the same errors. And write transactions
that run together (committed as one group in SQLite's inline mode) each commit, or fail,
as if alone."""
from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from datetime import datetime, timedelta, timezone
from pathlib import Path

import asyncpg
import pytest
import pytest_asyncio
from sqlalchemy import bindparam, event, insert, select, text, update
from sqlalchemy.engine import make_url
from sqlalchemy.exc import IntegrityError, MultipleResultsFound, NoResultFound

from core_service import db as core_db
from core_service.app import Core
from core_service.db import Database, JoinedRead, NotCommitted, prepared
from core_service.models import Device, Location, MfaLogin, Outbox, User
from core_service.settings import CoreSettings
from events.bus import RPC_CONCURRENCY
from tests.conftest import new_database_url

USERS = User.__table__
LOCATIONS = Location.__table__
LOGINS = MfaLogin.__table__
OUTBOX = Outbox.__table__
NOW = datetime(2026, 11, 26, 9, 30, tzinfo=timezone.utc)

# a read over types SQLAlchemy converts (UUID, aware datetime, bool, JSON) and a literal list
_LOGIN_READ = JoinedRead(LOGINS, USERS, LOCATIONS)
_READ = (
    select(*_LOGIN_READ.columns)
    .select_from(LOGINS)
    .join(USERS, USERS.c.id == LOGINS.c.user_id)
    .join(LOCATIONS, LOCATIONS.c.id == LOGINS.c.location_id)
    .where(LOGINS.c.token_hash == bindparam("b_token"), LOGINS.c.state.in_(["pending", "approved"]))
)
_PREPARED_READ = prepared(_READ)
_INSERT_LOGIN = prepared(insert(LOGINS))
_OUTBOX_ROWS = prepared(insert(OUTBOX).returning(OUTBOX.c.id))
_FAIL_USER = prepared(
    update(USERS).where(USERS.c.username == bindparam("b_name")).values(mfa_failures=USERS.c.mfa_failures + 1)
)


@pytest_asyncio.fixture
async def db(database_url: str) -> AsyncIterator[Database]:
    """SQLite in the inline mode (statements on SQLite's driver), or PostgreSQL (on asyncpg)."""
    database = Database(database_url, sqlite_inline=True)
    await database.migrate()
    assert database.inline == database.is_sqlite
    async with database.transaction() as session:
        session.add(User(username="alice", email="alice@example.com", mfa_locked_until=NOW))
        session.add(
            Location(
                name="office", endpoint="vpn.example.com", listen_port=51820, network="10.0.0.0/24",
                gateway_address="10.0.0.1/24", wg_public_key="k", wg_private_key_enc="e", sealing_public_key="s",
                sealing_private_key_enc="e", mfa_mode="internal", allowed_groups=["staff", "ops"],
            )
        )
        await session.flush()
        session.add(Device(user_id=1, name="laptop", pubkey="p"))
    yield database
    await database.close()


def login_values(token: str) -> dict[str, object]:
    login = MfaLogin(
        id=uuid.uuid4(), token_hash=token, location_id=1, device_id=1, user_id=1, method="totp", state="pending",
        client_ip="192.0.2.1", created_at=NOW, expires_at=NOW + timedelta(minutes=5),
    )
    return login.model_dump()


async def test_a_prepared_statement_reads_and_writes_what_sqlalchemy_does(db: Database) -> None:
    values = login_values("t1")
    async with db.transaction() as session:
        await session.exec(_INSERT_LOGIN, params=values)
    async with db.transaction() as session:
        driver = (await session.exec(_PREPARED_READ, params={"b_token": "t1"})).first()
        orm = (await session.exec(_READ, params={"b_token": "t1"})).first()
    assert db._prepared[_PREPARED_READ] is not None  # the driver path, not a fallback
    assert tuple(driver) == tuple(orm)
    login, user, location = _LOGIN_READ.split(driver)
    assert login.id == values["id"] and isinstance(login.id, uuid.UUID)
    assert login.expires_at == NOW + timedelta(minutes=5) and login.expires_at.tzinfo is not None
    assert user.is_active is True and user.mfa_locked_until == NOW
    assert location.allowed_groups == ["staff", "ops"]


_USER_NAMES = select(USERS.c.id, USERS.c.username).where(USERS.c.is_active == bindparam("b_active")).order_by(USERS.c.id)
_PREPARED_USER_NAMES = prepared(_USER_NAMES)


async def test_a_prepared_result_answers_as_sqlalchemys_result(db: Database) -> None:
    async with db.transaction() as session:
        session.add(User(username="bob", email="bob@example.com"))
    async with db.transaction() as session:
        async def both(method, active: bool = True):  # type: ignore[no-untyped-def]
            answers = []
            for statement in (_PREPARED_USER_NAMES, _USER_NAMES):
                result = await session.exec(statement, params={"b_active": active})
                try:
                    answers.append(method(result))
                except Exception as error:  # noqa: BLE001 - the same error either way
                    answers.append(type(error))
            assert answers[0] == answers[1], answers
            return answers[0]

        assert await both(lambda r: [tuple(row) for row in r.all()]) == [(1, "alice"), (2, "bob")]
        assert await both(lambda r: r.first().username) == "alice"
        assert await both(lambda r: r.scalars().all()) == [1, 2]
        assert await both(lambda r: r.one()) is MultipleResultsFound
        assert await both(lambda r: r.first(), active=False) is None
        assert await both(lambda r: r.scalar_one(), active=False) is NoResultFound
        assert await both(lambda r: [dict(m) for m in r.mappings()]) == [{"id": 1, "username": "alice"},
                                                                        {"id": 2, "username": "bob"}]
        assert await both(lambda r: r.scalar()) == 1  # what PreparedResult leaves to SQLAlchemy's Result
        assert await both(lambda r: [row.username for row in r]) == ["alice", "bob"]
    assert db._prepared[_PREPARED_USER_NAMES] is not None  # the driver path, not a fallback


async def test_a_multi_row_insert_runs_on_the_driver_with_each_rows_values(db: Database) -> None:
    driver_path: list[bool] = []

    def statement(_conn, _cursor, sql, _params, context, _many) -> None:  # type: ignore[no-untyped-def]
        if sql.startswith("INSERT INTO outbox"):
            driver_path.append(context is None)  # SQLAlchemy's own execution has a context

    event.listen(db.sync_engine, "before_cursor_execute", statement)
    try:
        for rows in (3, 1, 3):  # the SQL of each row count is made once and used again
            async with db.transaction() as session:
                values = [
                    {"kind": "event", "event_type": f"r{rows}.{i}", "payload": f'{{"i": {i}}}', "created_at": NOW}
                    for i in range(rows)
                ]
                ids = (await session.exec(_OUTBOX_ROWS, params=values)).scalars().all()
                assert len(set(ids)) == rows
    finally:
        event.remove(db.sync_engine, "before_cursor_execute", statement)
    assert driver_path == [True, True, True]
    async with db.reader() as session:
        stored = (await session.exec(select(OUTBOX.c.event_type, OUTBOX.c.payload).order_by(OUTBOX.c.id))).all()
    expected = [(f"r{rows}.{i}", f'{{"i": {i}}}') for rows in (3, 1, 3) for i in range(rows)]
    assert [tuple(row) for row in stored] == expected


async def test_prepared_statements_share_the_transaction_and_its_rollback(db: Database) -> None:
    with pytest.raises(RuntimeError):
        async with db.transaction() as session:
            changed = await session.exec(_FAIL_USER, params={"b_name": "alice"})
            assert changed.rowcount == 1
            raise RuntimeError("the body fails")
    async with db.transaction() as session:
        session.add(Outbox(kind="event", event_type="pending.orm", payload="{}", created_at=NOW))
        # a pending ORM object is flushed before a prepared statement runs, as SQLAlchemy's own execute does
        ids = (
            await session.exec(
                _OUTBOX_ROWS,
                params=[{"kind": "event", "event_type": f"e{i}", "payload": "{}", "created_at": NOW} for i in range(3)],
            )
        ).scalars().all()
        assert (await session.exec(_FAIL_USER, params={"b_name": "alice"})).rowcount == 1
    assert sorted(ids) == [2, 3, 4]
    async with db.reader() as session:
        user = (await session.exec(select(User).where(User.username == "alice"))).scalar_one()
        types = (await session.exec(select(Outbox.event_type).order_by(Outbox.id))).scalars().all()
    assert user.mfa_failures == 1  # the rolled-back increment is gone, the committed one stayed
    assert types == ["pending.orm", "e0", "e1", "e2"]


async def test_a_prepared_statement_fails_as_sqlalchemy_does_and_is_seen_by_listeners(db: Database) -> None:
    seen: list[str] = []

    def statement(_conn, _cursor, sql, _params, _context, _many) -> None:  # type: ignore[no-untyped-def]
        seen.append(sql.split()[0])

    event.listen(db.sync_engine, "before_cursor_execute", statement)
    try:
        async with db.transaction() as session:
            await session.exec(_INSERT_LOGIN, params=login_values("same"))
        with pytest.raises(IntegrityError):  # token_hash is unique
            async with db.transaction() as session:
                await session.exec(_INSERT_LOGIN, params=login_values("same"))
    finally:
        event.remove(db.sync_engine, "before_cursor_execute", statement)
    assert seen == ["INSERT", "INSERT"]
    async with db.reader() as session:
        assert len((await session.exec(select(MfaLogin))).scalars().all()) == 1


def count_commits(db: Database) -> list[object]:
    commits: list[object] = []
    event.listen(db.sync_engine, "commit", commits.append)
    return commits


async def outbox_types(db: Database) -> list[str]:
    async with db.reader() as session:
        return list((await session.exec(select(Outbox.event_type).order_by(Outbox.id))).scalars().all())


async def add_event(db: Database, event_type: str, *, then_fail: bool = False) -> list[str]:
    """One write transaction; what a reader sees right after it (its row must be there)."""
    async with db.transaction() as session:
        await session.exec(
            _OUTBOX_ROWS, params=[{"kind": "event", "event_type": event_type, "payload": "{}", "created_at": NOW}]
        )
        if then_fail:
            raise RuntimeError("the body fails")
    return await outbox_types(db)


async def test_write_transactions_that_run_together_each_return_committed(db: Database) -> None:
    commits = count_commits(db)
    seen = await asyncio.gather(*(add_event(db, f"e{i}") for i in range(5)))
    for i, types in enumerate(seen):
        assert f"e{i}" in types  # committed before its transaction returned
    assert sorted(await outbox_types(db)) == [f"e{i}" for i in range(5)]
    # SQLite in the inline mode: one COMMIT (one fsync) for the five; PostgreSQL: one each
    assert len(commits) == (1 if db.inline else 5)


async def test_a_failing_transaction_takes_back_its_own_writes_only(db: Database) -> None:
    async with db.transaction() as session:
        await session.exec(_INSERT_LOGIN, params=login_values("taken"))

    async def duplicate_login() -> None:
        async with db.transaction() as session:
            await session.exec(_FAIL_USER, params={"b_name": "alice"})
            await session.exec(_INSERT_LOGIN, params=login_values("taken"))  # token_hash is unique

    results = await asyncio.gather(
        add_event(db, "first"), add_event(db, "failed", then_fail=True), duplicate_login(), add_event(db, "last"),
        return_exceptions=True,
    )
    assert isinstance(results[1], RuntimeError) and isinstance(results[2], IntegrityError)
    assert sorted(await outbox_types(db)) == ["first", "last"]
    async with db.reader() as session:
        alice = (await session.exec(select(User).where(User.username == "alice"))).scalar_one()
    assert alice.mfa_failures == 0  # the failed transaction's first write went with it


async def test_a_failed_commit_fails_every_transaction_waiting_for_it(db: Database) -> None:
    if not db.inline:
        pytest.skip("transactions commit together in SQLite's inline mode only")
    failures = [OSError("disk I/O error")]

    def failing_commit(_connection) -> None:  # type: ignore[no-untyped-def]
        if failures:
            raise failures.pop()

    event.listen(db.sync_engine, "commit", failing_commit)
    results = await asyncio.gather(*(add_event(db, f"lost{i}") for i in range(3)), return_exceptions=True)
    assert all(isinstance(result, NotCommitted) for result in results), results
    assert "disk I/O error" in str(results[0])
    assert await outbox_types(db) == []  # none of them was committed
    assert await add_event(db, "next") == ["next"]  # and the next transaction works


# --- PostgreSQL: pooled connections that died -------------------------------------------------


@pytest_asyncio.fixture
async def pg(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Database]:
    """A core database on PostgreSQL, with one connection used and back in the pool."""
    database = Database(new_database_url("postgres", request, tmp_path))
    await database.migrate()
    assert await one_value(database, "SELECT 1") == 1
    yield database
    await database.close()


async def one_value(database: Database, sql: str) -> object:
    async with database.transaction() as session:
        return (await session.exec(text(sql))).scalar_one()  # type: ignore[call-overload]


async def terminate_its_connections(database: Database) -> int:
    """End, from the server's side, every other connection to this test's database, as a
    database restart would."""
    dsn = make_url(database.url).set(drivername="postgresql").render_as_string(hide_password=False)
    connection = await asyncpg.connect(dsn)
    try:
        count = await connection.fetchval(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity"
            " WHERE datname = current_database() AND pid <> pg_backend_pid()"
        )
    finally:
        await connection.close()
    await asyncio.sleep(0.2)  # the client sees its sockets close
    return count


@pytest.mark.postgres
async def test_a_connection_the_database_closed_is_replaced_before_use(pg: Database) -> None:
    assert await terminate_its_connections(pg) >= 1
    # the next transaction gets a live connection, without a ping
    assert await one_value(pg, "SELECT 2") == 2


@pytest.mark.postgres
async def test_an_idle_connection_that_died_unnoticed_is_pinged_and_replaced(
    pg: Database, monkeypatch: pytest.MonkeyPatch
) -> None:
    # a peer that went away silently (no closed socket seen): only a ping finds out
    monkeypatch.setattr(asyncpg.Connection, "is_closed", lambda _self: False)
    monkeypatch.setattr(core_db, "PING_AFTER_IDLE_S", 0.0)
    assert await terminate_its_connections(pg) >= 1
    assert await one_value(pg, "SELECT 3") == 3


@pytest.mark.postgres
async def test_a_core_under_steady_load_opens_no_new_database_connection(
    request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    """PostgreSQL starts a process for every connection, and a new one prepares the
    login's statements again: a core handling as many requests at once as it takes on one
    subject keeps the connections its first such moment opened."""
    core = Core(CoreSettings(database_url=new_database_url("postgres", request, tmp_path), state_dir=tmp_path))
    database = core.db
    await database.migrate()
    opened: list[object] = []
    event.listen(database.sync_engine, "connect", lambda connection, _record: opened.append(connection))

    async def requests_at_once() -> None:
        all_in = asyncio.Barrier(RPC_CONCURRENCY)

        async def request_holding_a_connection() -> None:
            async with database.transaction() as session:
                await session.exec(text("SELECT 1"))  # type: ignore[call-overload]
                await all_in.wait()  # every request holds its connection at the same time

        await asyncio.wait_for(asyncio.gather(*(request_holding_a_connection() for _ in range(RPC_CONCURRENCY))), 30)

    try:
        await requests_at_once()
        assert len(opened) == RPC_CONCURRENCY
        for _ in range(3):
            await requests_at_once()
        assert len(opened) == RPC_CONCURRENCY
    finally:
        await database.close()


@pytest.mark.postgres
async def test_the_pool_size_is_the_operators_setting(
    request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("WGMFA_DATABASE_POOL_SIZE", "4")
    core = Core(CoreSettings(database_url=new_database_url("postgres", request, tmp_path), state_dir=tmp_path))
    try:
        assert core.db.engine is not None and core.db.engine.pool.size() == 4  # type: ignore[attr-defined]
    finally:
        await core.db.close()
