"""The store interface: what handlers, runner and pipeline see, whichever database runs.

Two implementations sit behind it: `imagebot.store.sqlite.SqliteDatabase` (the embedded
default: a file path) and `imagebot.store.postgresql.PostgresDatabase` (a `postgresql://`
URL). `connect_store(target)` picks one. Both run a write transaction as one synchronous
function `fn(conn)` on a writer thread (`write(fn)`), and both hand `fn` a connection with the
sqlite3 shape (`conn.execute(sql, params)` with `?` placeholders, rows readable by name and
by index, `cursor.rowcount`, `cursor.lastrowid`), so the SQL in the store modules is written
once, in the subset both databases accept. Timestamps cross the interface as ISO-8601 UTC
text ("2026-11-21T10:15:30.123Z": text order is time order) and JSON columns as JSON text;
PostgreSQL keeps them as timestamptz and jsonb and converts at the edge.

Dialect differences the store modules need are hooks on the store: `lock(conn, key)`
serializes read-then-write transactions across processes (a no-op on SQLite, whose
BEGIN IMMEDIATE already does), `for_update` locks claimed rows (`FOR UPDATE SKIP LOCKED`),
`clock_sql(offset)` is the database's clock in SQL (leases and heartbeats), `shared` says
whether several processes may use the database at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
import sys
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any, Protocol, TypeAlias, TypeVar

from imagebot.clock import iso
from imagebot.errors import StoreError

T = TypeVar("T")

# A result row: sqlite3.Row or PostgreSQL's twin (by index and by column name, `keys()`).
Row: TypeAlias = Any


URGENT, NORMAL = 0, 2
# A handler's writes while its user waits for the first answer (creating a job, saving its
# status message, releasing it to the runner): on SQLite ahead of queued job writes, on
# PostgreSQL on writers of their own. With hundreds of jobs running, their writes queued in
# front of the handlers' and the first answer came seconds late.
INTERACTIVE = 1
# Short writes that pace Telegram sends (send slots): on PostgreSQL they have a writer of
# their own, so they neither wait behind job writes nor hold up the webhook's saves.
PACING = -1


def hand_back(
    loop: asyncio.AbstractEventLoop,
    waiter: asyncio.Future[Any],
    result: Any = None,
    error: BaseException | None = None,
) -> None:
    """From a writer thread: settle `waiter`, a future of `loop`, with the result or error.

    The awaiting coroutine runs two turns of its loop later (this settles the future, then
    the task steps). `asyncio.shield(asyncio.wrap_future(f))` took three, and every await of
    the store pays it: at 200 updates a second a turn of the busy main loop lasts tens of
    ms, and an update's first answer awaits the store three times. A waiter canceled
    meanwhile is left alone: the write ran all the same (as it did under the shield)."""

    def settle() -> None:
        if waiter.done():
            return
        if error is None:
            waiter.set_result(result)
        else:
            waiter.set_exception(error)

    with contextlib.suppress(RuntimeError):  # that loop is closed: nobody awaits it now
        loop.call_soon_threadsafe(settle)


class Cursor(Protocol):
    """What a write function may read back from `conn.execute` (sqlite3.Cursor's shape)."""

    @property
    def rowcount(self) -> int: ...

    @property
    def lastrowid(self) -> int | None: ...

    def fetchone(self) -> Any: ...

    def fetchall(self) -> list[Any]: ...

    def __iter__(self) -> Iterator[Any]: ...


class Conn(Protocol):
    """The connection a write function gets (sqlite3.Connection's shape, `?` placeholders)."""

    def execute(self, sql: str, parameters: Any = ..., /) -> Cursor: ...

    def executemany(self, sql: str, parameters: Any, /) -> Cursor: ...


# SQLite primary result codes that mean "the storage under the database failed" (disk full,
# I/O error, file-size limit, read-only or vanished file, locked by another process), as
# opposed to a bug in a statement (which stays a crash, not a fault to wait out).
_STORAGE_CODES = frozenset({5, 6, 7, 8, 10, 11, 13, 14, 15, 26})  # BUSY LOCKED NOMEM READONLY
# IOERR CORRUPT FULL CANTOPEN PROTOCOL NOTADB
_STORAGE_ERRNOS = frozenset({5, 27, 28, 30, 122})  # EIO EFBIG ENOSPC EROFS EDQUOT
# PostgreSQL SQLSTATE classes of a server that is away or out of resources (not a bad query):
# 08 connection exception, 53 insufficient resources (disk full), 57 operator intervention
# (shutdown, crash recovery), 58 system error (I/O).
_PG_FAULT_CLASSES = ("08", "53", "57", "58")
# idle_in_transaction_session_timeout: the server ended a session that stalled inside a
# transaction (see PostgresDatabase); nothing of it was written, so it is retried as a fault
_PG_FAULT_STATES = ("25P03",)


def is_storage_fault(exc: BaseException) -> bool:
    """True when `exc` says the database or its disk refused, not that the code erred."""
    if isinstance(exc, sqlite3.Error):
        code = getattr(exc, "sqlite_errorcode", None)
        if code is not None:
            return code & 0xFF in _STORAGE_CODES
        text = str(exc).lower()
        return any(word in text for word in ("disk", "i/o error", "locked", "readonly"))
    if isinstance(exc, StoreUnavailable):
        return True
    psycopg = sys.modules.get("psycopg")  # only loaded when PostgreSQL is in use
    if psycopg is not None and isinstance(exc, psycopg.Error):
        if isinstance(exc, psycopg.OperationalError | psycopg.InterfaceError):
            return True
        sqlstate = getattr(exc, "sqlstate", None) or ""
        return sqlstate[:2] in _PG_FAULT_CLASSES or sqlstate in _PG_FAULT_STATES
    if isinstance(exc, OSError):
        return exc.errno in _STORAGE_ERRNOS
    return False


class StoreUnavailable(Exception):
    """The database server cannot be reached now (a storage fault: wait it out)."""


def _store_read_errors() -> tuple[type[BaseException], ...]:
    errors: list[type[BaseException]] = [sqlite3.Error, StoreError, StoreUnavailable, ValueError]
    try:
        import psycopg
    except ImportError:  # pragma: no cover - a dependency, but SQLite alone needs none of it
        return tuple(errors)
    return (*errors, psycopg.Error)


STORE_READ_ERRORS = _store_read_errors()  # what a failed read of either database raises


class WriteHealth:
    """Whether the last write reached the database: /healthz is not ready while it did not."""

    def __init__(self) -> None:
        self.ok = True
        self.last_ok_at = time.monotonic()
        self.failing_since: float | None = None
        self.last_error: str | None = None
        self.failures = 0

    def succeeded(self) -> None:
        self.ok = True
        self.last_ok_at = time.monotonic()
        self.failing_since = None

    def failed(self, exc: BaseException) -> None:
        if self.ok:
            self.failing_since = time.monotonic()
        self.ok = False
        self.failures += 1
        self.last_error = f"{type(exc).__name__}: {exc}"[:200]


class Database(ABC):
    """One database: connections, whole-function write transactions, reads, health.

    `Database(target)` makes the implementation `target` names (see `connect_store`).
    """

    def __new__(cls, target: str | Path, *args: Any, **kwargs: Any) -> Database:
        if cls is Database:
            if is_postgresql_url(target):
                from imagebot.store.postgresql import PostgresDatabase

                cls = PostgresDatabase
            else:
                from imagebot.store.sqlite import SqliteDatabase

                cls = SqliteDatabase
        return super().__new__(cls)

    dialect: str
    #: several processes may use this database at once (PostgreSQL; a SQLite file is locked)
    shared: bool = False
    #: appended to a SELECT that picks rows to claim ("" where one writer serializes anyway)
    for_update: str = ""
    writes: WriteHealth

    @property
    @abstractmethod
    def where(self) -> str:
        """The database named for operators (a path, or host:port/dbname; never a password)."""

    @abstractmethod
    async def open(self) -> None:
        """Connect; StoreError (naming the path or host and port) if that cannot be done."""

    @abstractmethod
    async def close(self) -> None: ...

    @abstractmethod
    async def run(self, fn: Callable[[Any], T], *, priority: int = NORMAL) -> T:
        """Run `fn(conn)` on the writer, outside a transaction (migrations)."""

    @abstractmethod
    async def write(self, fn: Callable[[Any], T], *, priority: int = NORMAL) -> T:
        """Run `fn(conn)` as one transaction (ROLLBACK if it raises). Once submitted it runs
        even if the awaiting task is canceled. URGENT work goes ahead of queued job writes."""

    @abstractmethod
    async def execute_write(
        self, sql: str, params: Iterable[Any] = (), *, priority: int = NORMAL
    ) -> int:
        """One statement in its own transaction; returns the rows changed."""

    @abstractmethod
    async def fetchall(self, sql: str, params: Iterable[Any] = ()) -> list[Row]: ...

    async def write_aside(self, fn: Callable[[Any], T]) -> T:
        """`write(fn)` for a transaction of large rows (result images): PostgreSQL runs it on a
        connection of its own, so job writes do not queue behind it; SQLite's one writer runs
        it in its turn."""
        return await self.write(fn)

    async def fetchall_binary(self, sql: str, params: Iterable[Any] = ()) -> list[Row]:
        """`fetchall` for rows with large binary columns (PostgreSQL sends them in binary: half
        the bytes of hex text, and nothing to decode)."""
        return await self.fetchall(sql, params)

    async def fetchone(self, sql: str, params: Iterable[Any] = ()) -> Row | None:
        """The first row of a query that returns at most a few (by key, or an aggregate)."""
        rows = await self.fetchall(sql, params)
        return rows[0] if rows else None

    def forget_schema(self) -> None:  # noqa: B027 - a no-op hook by default
        """Called after migrations: forget anything cached about the schema."""

    @abstractmethod
    def clock_sql(self, offset_s: float = 0.0) -> str:
        """An SQL expression for the database's clock plus `offset_s` seconds, comparable with
        the timestamp columns. Leases, heartbeats and job fences use it, never a process's
        clock: a process frozen for a minute wakes with the right time only there."""

    def lock(self, conn: Any, key: str) -> None:  # noqa: B027 - a no-op hook by default
        """Inside a write transaction: wait until no other transaction holds `key`, then hold
        it to the end of this one (read-then-write checks stay exact across processes)."""

    def plus_seconds_sql(self, expr: str, seconds: float) -> str:
        """SQL for the timestamp expression `expr` (a column, `clock_sql()`) plus `seconds`
        (negative: minus). `seconds` comes from the code or settings, never from a user: it
        is written into the SQL."""
        raise NotImplementedError

    async def probe_write(self) -> bool:
        """Rewrite the one-row write_probe table: does the database take writes now?"""
        try:
            await self.execute_write(
                "INSERT INTO write_probe (id, written_at) VALUES (1, ?)"
                " ON CONFLICT (id) DO UPDATE SET written_at = excluded.written_at",
                (iso(),),
            )
        except Exception as exc:
            if not is_storage_fault(exc):
                raise
            return False
        return True

    async def is_healthy(self) -> bool:
        try:
            row = await self.fetchone("SELECT 1")
        except Exception as exc:
            if is_storage_fault(exc) or isinstance(exc, StoreError | ValueError):
                return False
            raise
        return row is not None


def is_postgresql_url(target: str | Path) -> bool:
    return isinstance(target, str) and target.startswith(("postgresql://", "postgres://"))


def connect_store(
    target: str | Path,
    *,
    synchronous: str = "full",
    exclusive: bool = False,
    stalled_after_s: float | None = None,
) -> Database:
    """The store for `storage.database`: a postgresql:// URL or a SQLite file path.

    `exclusive` (the bot itself): a SQLite file serves one bot process, and `open()` raises
    StoreInUse while another holds it; PostgreSQL ignores it. `stalled_after_s` (the bot
    itself, PostgreSQL): see PostgresDatabase.
    """
    if is_postgresql_url(target):
        from imagebot.store.postgresql import PostgresDatabase

        return PostgresDatabase(str(target), stalled_after_s=stalled_after_s)
    from imagebot.store.sqlite import SqliteDatabase

    return SqliteDatabase(Path(target), synchronous=synchronous, exclusive=exclusive)


__all__ = [
    "INTERACTIVE",
    "NORMAL",
    "PACING",
    "STORE_READ_ERRORS",
    "URGENT",
    "Conn",
    "Cursor",
    "Database",
    "Row",
    "StoreUnavailable",
    "WriteHealth",
    "connect_store",
    "is_storage_fault",
]
