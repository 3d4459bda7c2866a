"""What a complete TOTP login costs the database: SQL statements and transactions, counted
on the core's engine (SQLite and PostgreSQL). A count, not a timing: it only moves when the
login path's SQL changes, and it may only go down."""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from sqlalchemy import event

from schemas import rpc
from tests.test_core import Harness, running_core

# start: one read (location, device, placement, user, the address's failures), the
# replaced logins ended, the login and its audit event written. finish, one transaction:
# one locked read (login, user, location, device, the address's failures), the attempt
# taken, the TOTP step claimed, the login finished, the generation taken,
# the live session read, the new session and its outbox rows written; a login that
# replaces a live session also ends that one.
STATEMENTS_PER_LOGIN = [12, 13]  # the first login, one replacing a live session
TRANSACTIONS_PER_LOGIN = 2  # start, finish
CLIENT = rpc.ClientInfo(ip="192.0.2.10")


@contextmanager
def counted(h: Harness) -> Iterator[dict[str, list]]:
    seen: dict[str, list] = {"statements": [], "commits": [], "through_sqlalchemy": []}
    engine = h.core.db.sync_engine

    def statement(_conn, _cursor, sql, _params, context, _many) -> None:  # type: ignore[no-untyped-def]
        seen["statements"].append(sql[:120])
        if context is not None:  # SQLAlchemy's own execution, not a prepared statement's
            seen["through_sqlalchemy"].append(sql[:120])

    def commit(_conn) -> None:  # type: ignore[no-untyped-def]
        seen["commits"].append(1)

    event.listen(engine, "before_cursor_execute", statement)
    event.listen(engine, "commit", commit)
    try:
        yield seen
    finally:
        event.remove(engine, "before_cursor_execute", statement)
        event.remove(engine, "commit", commit)


async def two_logins_counted(h: Harness, *, prepared: bool = True) -> None:
    location, _ = await h.location()
    secret = await h.user("alice")
    device = await h.device("alice", "laptop", "office")
    h.clock.advance(60)  # a time step the enrollment did not use
    for round_ in range(2):  # the first login, and one that replaces a live session
        with counted(h) as seen:
            token, _ = await h.client.start(location.id, device.pubkey, 0, CLIENT)
            psk, _ = await h.client.finish(token, h.code(secret), None, CLIENT)
        assert len(psk) == 44
        assert len(seen["statements"]) <= STATEMENTS_PER_LOGIN[round_], seen["statements"]
        assert len(seen["commits"]) <= TRANSACTIONS_PER_LOGIN
        if prepared:  # every statement compiled once, none through SQLAlchemy's general path
            assert seen["through_sqlalchemy"] == [], seen["through_sqlalchemy"]
        h.clock.advance(30)
    sessions = await h.sql("SELECT state FROM vpn_session ORDER BY id")
    assert [s for (s,) in sessions] == ["revoked", "authorized"]


async def test_a_totp_login_takes_a_bounded_number_of_statements(nats_url: str, database_url: str, tmp_path: Path) -> None:
    # the relay's retry loop out of the way: only the requests' own statements count
    async with running_core(nats_url, database_url, tmp_path, outbox_interval_s=3600) as h:
        assert h.core.db.inline == database_url.startswith("sqlite")  # SQLite: statements on the loop by default
        await two_logins_counted(h)


async def test_the_same_on_sqlite_through_aiosqlites_thread(nats_url: str, tmp_path: Path) -> None:
    """WGMFA_SQLITE_INLINE=false, for several core processes on one SQLite file."""
    url = f"sqlite+aiosqlite:///{tmp_path / 'core.db'}"
    async with running_core(nats_url, url, tmp_path, outbox_interval_s=3600, sqlite_inline=False) as h:
        assert not h.core.db.inline
        await two_logins_counted(h, prepared=False)  # aiosqlite: SQLAlchemy runs everything
