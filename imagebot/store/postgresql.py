"""The PostgreSQL store (psycopg 3): same interface and rules as the SQLite one.

Writes: lanes of writer threads, each thread owning one connection: URGENT (updates saved
before Telegram is answered, payments, heartbeats and leases), INTERACTIVE (a handler's job
creation and status message while its user waits; two threads), NORMAL (job writes), PACING
(send-slot reservations, one per Telegram send; two threads) and the aside lane
(`write_aside`: result images, megabytes each), so the webhook never waits behind a job
transaction or a burst of sends, and job writes keep the order they were submitted in, as
on SQLite. A lane of two threads hands writes out in turn: its writes are each whole on the
server (one statement, or a transaction under its advisory locks) and their callers await
them one by one. Each write function runs whole inside BEGIN … COMMIT on its thread. Reads
go through a small psycopg-pool (checked on checkout, so a restarted server costs no failed
read).

The connection handed to write functions has sqlite3's shape, so the store modules' SQL is
written once: `?` placeholders become `%s`, an INSERT into a table with an identity `id`
gets `RETURNING id` for `cursor.lastrowid`, Python booleans go in as 0/1 (flags are integer
columns on both databases). Rows come back with timestamptz as ISO-8601 UTC text, jsonb as
JSON text and integral numerics as int: what SQLite returns.

When the server goes away (restart, crash, network), a call fails with a storage fault
(StoreUnavailable or psycopg.OperationalError): callers wait it out as they do a full disk,
and the next call connects again, at most once per backoff step (0.1 s doubling to 2 s).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import re
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from datetime import datetime
from decimal import Decimal
from functools import lru_cache
from typing import Any, TypeVar

import psycopg
from psycopg.abc import Buffer
from psycopg.adapt import Loader
from psycopg.conninfo import conninfo_to_dict
from psycopg.types.string import TextLoader
from psycopg_pool import ConnectionPool, PoolTimeout

from imagebot.clock import iso
from imagebot.errors import StoreError
from imagebot.store.db import (
    INTERACTIVE,
    NORMAL,
    PACING,
    URGENT,
    Database,
    Row,
    StoreUnavailable,
    WriteHealth,
    is_storage_fault,
)
from imagebot.store.sqlite import _WriterThread

T = TypeVar("T")

CONNECT_TIMEOUT_S = 5
READ_WAIT_S = 2  # a read waits this long for a pooled connection while the server is away
# A pooled connection idle longer than this is pinged before a read uses it; one used more
# recently is trusted (the ping is a round trip per read on the hot path) and, if it turns
# out broken after all, the read is tried once more on a fresh connection.
CHECK_IDLE_S = 1.0
_BACKOFF_FIRST_S, _BACKOFF_MAX_S = 0.1, 2.0
_ASIDE = NORMAL + 1  # the key of write_aside's lane (large rows: result images)
# Writer threads (connections) per lane; the rest have one. Each process holds these plus
# the read pool's READ_POOL_MAX, the LISTEN connection and the NOTIFY one.
_LANE_SIZES = {INTERACTIVE: 2, PACING: 2}
READ_POOL_MAX = 4
_INSERT_RE = re.compile(r'^\s*INSERT\s+INTO\s+"?(\w+)"?', re.IGNORECASE)
_CHANGES_RE = re.compile(r"^\s*(INSERT|UPDATE|DELETE)\b", re.IGNORECASE)


@lru_cache(maxsize=1024)
def translate(sql: str) -> str:
    """`?` placeholders to `%s` (and a literal `%` to `%%`), outside quoted strings."""
    out: list[str] = []
    quote = ""
    for ch in sql:
        if quote:
            if ch == quote:
                quote = ""
            out.append("%%" if ch == "%" else ch)
        elif ch in "'\"":
            quote = ch
            out.append(ch)
        elif ch == "?":
            out.append("%s")
        elif ch == "%":
            out.append("%%")
        else:
            out.append(ch)
    return "".join(out)


def _params(params: Any) -> Any:
    if params is None:
        return None
    if isinstance(params, dict):
        return params
    return tuple(int(v) if isinstance(v, bool) else v for v in params)


def _value(value: Any) -> Any:
    if isinstance(value, datetime):
        return iso(value)
    if isinstance(value, Decimal):
        return int(value) if value == value.to_integral_value() else float(value)
    return value


class PgRow:
    """A result row read like sqlite3.Row: by index, by column name, `keys()`."""

    __slots__ = ("_index", "_values")

    def __init__(self, index: dict[str, int], values: tuple[Any, ...]) -> None:
        self._index = index
        self._values = values

    def __getitem__(self, key: int | str) -> Any:
        if isinstance(key, str):
            return self._values[self._index[key]]
        return self._values[key]

    def keys(self) -> list[str]:
        return list(self._index)

    def __iter__(self) -> Iterator[Any]:
        return iter(self._values)

    def __len__(self) -> int:
        return len(self._values)

    def __eq__(self, other: object) -> bool:
        if isinstance(other, PgRow):
            return self._values == other._values and self._index == other._index
        return NotImplemented

    def __hash__(self) -> int:
        return hash(self._values)

    def __repr__(self) -> str:
        return f"PgRow({dict(zip(self._index, self._values, strict=True))!r})"


def row_factory(cursor: Any) -> Callable[[Sequence[Any]], PgRow]:
    description = cursor.description or ()
    index = {column.name: n for n, column in enumerate(description)}
    return lambda values: PgRow(index, tuple(_value(v) for v in values))


class IsoTimestampLoader(Loader):
    """timestamptz straight from the server's text to the store's ISO text ("…T…sssZ").

    The session runs in UTC with ISO dates (set in `configure`), so the server sends
    "2026-12-03 18:00:09.495187+00" and this is a few string slices; building a datetime per
    value and formatting it again cost 30-50 ms of GIL per 1,000 job rows (a queue refresh
    with many jobs waiting), which showed as webhook ack latency under load. Any other shape
    is parsed exactly instead."""

    def load(self, data: Buffer) -> str:
        text = bytes(data).decode()
        if text.endswith("+00") and len(text) >= 22 and text[10] == " ":
            body = text[:-3]
            frac = (body[20:] + "000")[:3] if len(body) > 19 else "000"
            return f"{body[:10]}T{body[11:19]}.{frac}Z"
        return iso(datetime.fromisoformat(text))


def configure(conn: psycopg.Connection[Any]) -> None:
    """Per connection: jsonb and json are read as text (callers json.loads, as on SQLite),
    timestamptz as ISO-8601 UTC text (the session's TimeZone is UTC, dates ISO)."""
    conn.adapters.register_loader("jsonb", TextLoader)
    conn.adapters.register_loader("json", TextLoader)
    conn.adapters.register_loader("timestamptz", IsoTimestampLoader)
    conn.execute("SET TimeZone = 'UTC'")  # every connection here is autocommit
    conn.execute("SET DateStyle = 'ISO'")


def connect(
    url: str, *, stalled_after_s: float | None = None, **kwargs: Any
) -> psycopg.Connection[Any]:
    """A configured autocommit connection. `stalled_after_s`: see PostgresDatabase."""
    conn: psycopg.Connection[Any] = psycopg.connect(
        url,
        autocommit=True,
        row_factory=row_factory,
        connect_timeout=CONNECT_TIMEOUT_S,
        application_name="imagebot",
        **kwargs,
    )
    try:
        configure(conn)
        if stalled_after_s is not None:
            # A process frozen (SIGSTOP, a paused VM) between a transaction's statements
            # keeps its row and advisory locks (the claim's, the reaper's) while its lease
            # runs out; the live processes' takeover would wait behind them until it woke.
            # The server ends such a session instead, and its transaction with it. (At
            # least 1 ms: 0 would turn the timeout off.)
            conn.execute(
                "SELECT set_config('idle_in_transaction_session_timeout', %s, false)",
                (str(max(1, round(stalled_after_s * 1000))),),
            )
    except BaseException:
        conn.close()  # not left open behind a failed set-up
        raise
    return conn


def server_address(url: str) -> str:
    """host:port the URL (or libpq's PG* variables, or the defaults) point at; no password."""
    try:
        info = conninfo_to_dict(url)
    except psycopg.ProgrammingError:
        info = {}
    host = str(info.get("host") or os.environ.get("PGHOST") or "/var/run/postgresql")
    port = str(info.get("port") or os.environ.get("PGPORT") or "5432")
    return f"{host}:{port}"


def database_name(url: str) -> str:
    try:
        info = conninfo_to_dict(url)
    except psycopg.ProgrammingError:
        return "?"
    return str(info.get("dbname") or os.environ.get("PGDATABASE") or info.get("user") or "")


class _Cursor:
    """sqlite3.Cursor's shape over a psycopg cursor."""

    __slots__ = ("_cursor", "lastrowid", "rowcount")

    def __init__(self, cursor: psycopg.Cursor[Any], lastrowid: int | None) -> None:
        self._cursor = cursor
        self.rowcount = cursor.rowcount
        self.lastrowid = lastrowid

    def fetchone(self) -> Any:
        return self._cursor.fetchone()

    def fetchall(self) -> list[Any]:
        return self._cursor.fetchall()

    def __iter__(self) -> Iterator[Any]:
        return iter(self._cursor.fetchall())


class PgConn:
    """sqlite3.Connection's shape (execute, executemany) over a psycopg connection."""

    def __init__(self, conn: psycopg.Connection[Any], identity_tables: frozenset[str]) -> None:
        self.raw = conn
        self._identity = identity_tables
        self.changes = 0

    def execute(self, sql: str, parameters: Any = (), /) -> _Cursor:
        text = translate(sql)
        lastrowid_wanted = False
        match = _INSERT_RE.match(text)
        if match and match.group(1).lower() in self._identity and "RETURNING" not in text.upper():
            text += " RETURNING id"
            lastrowid_wanted = True
        cursor = self.raw.execute(text, _params(parameters))
        lastrowid = None
        if lastrowid_wanted and cursor.rowcount == 1:
            row = cursor.fetchone()
            lastrowid = int(row[0]) if row is not None else None
        if _CHANGES_RE.match(text) and cursor.rowcount > 0:
            self.changes += cursor.rowcount
        return _Cursor(cursor, lastrowid)

    def executemany(self, sql: str, parameters: Iterable[Any], /) -> _Cursor:
        cursor = self.raw.cursor()
        cursor.executemany(translate(sql), [_params(p) for p in parameters])
        if _CHANGES_RE.match(sql) and cursor.rowcount > 0:
            self.changes += cursor.rowcount
        return _Cursor(cursor, None)


class _Breaks:
    """What a database's writer links learned about the server, shared between them.

    A server restart breaks every connection, but psycopg learns it only when one is used:
    without `count`, each writer's first transaction after the restart would fail in turn (a
    job suspended, /healthz unready again) long after the first writer had found out. And a
    writer waiting out its reconnect backoff while another has connected again (`connects`)
    tries at once: otherwise its writes kept failing for up to the backoff's 2 s after the
    server was back, and /healthz went from ready back to unready."""

    def __init__(self) -> None:
        self.count = 0  # connections found broken
        self.connects = 0  # connections made (after the first, each means "the server is up")


class _Link:
    """The connection one writer thread owns; made again after the server went away."""

    def __init__(
        self, url: str, where: str, breaks: _Breaks, stalled_after_s: float | None = None
    ) -> None:
        self.url = url
        self.where = where
        self.stalled_after_s = stalled_after_s
        self.conn: psycopg.Connection[Any] | None = None
        self._delay = 0.0
        self._next_try = 0.0
        self._breaks = breaks
        self._breaks_seen = breaks.count
        self._connects_seen = breaks.connects

    def get(self) -> psycopg.Connection[Any]:
        conn = self.conn
        if conn is not None and not conn.closed and not conn.broken:
            if self._breaks_seen == self._breaks.count:
                return conn
            # Another writer's connection broke since this one was last used: one round trip
            # to see that this one survived, rather than a failed transaction.
            self._breaks_seen = self._breaks.count
            with contextlib.suppress(psycopg.Error):
                conn.execute("SELECT 1")
                return conn
        self.drop()
        now = time.monotonic()
        if now < self._next_try and self._connects_seen == self._breaks.connects:
            raise StoreUnavailable(f"PostgreSQL at {self.where} is unreachable (retrying)")
        self._connects_seen = self._breaks.connects
        try:
            conn = connect(self.url, stalled_after_s=self.stalled_after_s)
        except psycopg.OperationalError as exc:
            self._delay = min(max(self._delay * 2, _BACKOFF_FIRST_S), _BACKOFF_MAX_S)
            self._next_try = now + self._delay
            raise StoreUnavailable(
                f"PostgreSQL at {self.where} is unreachable: {_first_line(exc)}"
            ) from exc
        self._delay = 0.0
        self._next_try = 0.0
        self._breaks.connects += 1
        self._breaks_seen = self._breaks.count
        self._connects_seen = self._breaks.connects
        self.conn = conn
        return conn

    def broke(self) -> None:
        """This link's connection was found broken (the server went away): drop it, and have
        every other link of the database check its own before its next use."""
        self._breaks.count += 1
        self.drop()

    def drop(self) -> None:
        if self.conn is not None:
            try:
                self.conn.close()
            finally:
                self.conn = None


def _check_if_idle(conn: psycopg.Connection[Any]) -> None:
    """The pool's checkout check: ping only a connection that sat idle (see CHECK_IDLE_S)."""
    used_at = getattr(conn, "_imagebot_used_at", 0.0)
    if time.monotonic() - used_at > CHECK_IDLE_S:
        ConnectionPool.check_connection(conn)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


class PostgresDatabase(Database):
    """`storage.database = "postgresql://…"`: lanes of writer threads, a read pool."""

    dialect = "postgresql"
    for_update = " FOR UPDATE SKIP LOCKED"
    shared = True

    def clock_sql(self, offset_s: float = 0.0) -> str:
        # clock_timestamp(), not now(): a long transaction must not see an old time
        return f"(clock_timestamp() + make_interval(secs => {float(offset_s):.3f}))"

    def __init__(
        self, url: str, *, synchronous: str = "full", stalled_after_s: float | None = None
    ) -> None:
        """`stalled_after_s`: a writer's session idle inside a transaction that long is ended
        by the server (the bot: a third of its lease); None (tools such as the store copy,
        whose one long transaction waits on its own reads) leaves the server's setting."""
        self.url = url
        self.stalled_after_s = stalled_after_s
        self.address = server_address(url)
        self.dbname = database_name(url)
        self.writes = WriteHealth()
        # lane key -> its writer threads, each with the connection it owns
        self._lanes: dict[int, list[tuple[_WriterThread, _Link]]] = {}
        self._turn = itertools.count()
        self._breaks = _Breaks()
        self._pool: ConnectionPool[Any] | None = None
        self._identity: frozenset[str] | None = None
        self._identity_lock = threading.Lock()

    @property
    def where(self) -> str:
        return f"PostgreSQL {self.address}/{self.dbname}"

    async def open(self) -> None:
        try:
            probe = await asyncio.to_thread(connect, self.url)
        except psycopg.OperationalError as exc:
            raise StoreError(
                f"cannot reach PostgreSQL at {self.address}: {_first_line(exc)}"
            ) from None
        await asyncio.to_thread(probe.close)
        lanes = (
            (URGENT, "pg-writer-urgent"),
            (INTERACTIVE, "pg-writer-interactive"),
            (NORMAL, "pg-writer"),
            (_ASIDE, "pg-writer-aside"),
            (PACING, "pg-writer-pacing"),
        )
        for key, name in lanes:
            self._lanes[key] = [
                (
                    _WriterThread(f"{name}-{n}" if n else name),
                    _Link(self.url, self.address, self._breaks, self.stalled_after_s),
                )
                for n in range(_LANE_SIZES.get(key, 1))
            ]
        self._pool = ConnectionPool(
            self.url,
            min_size=1,
            max_size=READ_POOL_MAX,
            open=False,
            timeout=READ_WAIT_S,
            check=_check_if_idle,
            configure=configure,
            kwargs={
                "autocommit": True,
                "row_factory": row_factory,
                "connect_timeout": CONNECT_TIMEOUT_S,
                "application_name": "imagebot",
            },
            name="imagebot-read",
        )
        await asyncio.to_thread(self._pool.open)

    async def close(self) -> None:
        for writers in list(self._lanes.values()):
            for lane, link in writers:
                await asyncio.wrap_future(lane.submit(link.drop, NORMAL))
                await asyncio.to_thread(lane.stop)
        self._lanes.clear()
        if self._pool is not None:
            pool, self._pool = self._pool, None
            await asyncio.to_thread(pool.close)

    def identity_tables(self, conn: psycopg.Connection[Any]) -> frozenset[str]:
        """Tables whose `id` is an identity column (their INSERTs return it as lastrowid)."""
        with self._identity_lock:
            if self._identity is None:
                rows = conn.execute(
                    "SELECT table_name FROM information_schema.columns"
                    " WHERE table_schema = current_schema() AND column_name = 'id'"
                    " AND is_identity = 'YES'"
                ).fetchall()
                self._identity = frozenset(str(row[0]) for row in rows)
            return self._identity

    def forget_schema(self) -> None:
        """Called after migrations: the identity tables are read again."""
        with self._identity_lock:
            self._identity = None

    async def run(self, fn: Callable[[Any], T], *, priority: int = NORMAL) -> T:
        return await self._submit(fn, priority, transaction=False)

    async def write(self, fn: Callable[[Any], T], *, priority: int = NORMAL) -> T:
        return await self._submit(fn, priority, transaction=True)

    async def _submit(self, fn: Callable[[Any], T], priority: int, *, transaction: bool) -> T:
        key = priority if priority in (URGENT, INTERACTIVE, _ASIDE, PACING) else NORMAL
        writers = self._lanes.get(key)
        if not writers:
            raise StoreError("database is not open")
        lane, link = writers[next(self._turn) % len(writers)]
        health = self.writes

        def call() -> T:
            try:
                raw = link.get()
                conn = PgConn(raw, self.identity_tables(raw))
                if transaction:
                    with raw.transaction():
                        result = fn(conn)
                else:
                    result = fn(conn)
            except BaseException as exc:
                if is_storage_fault(exc):
                    health.failed(exc)
                    if link.conn is not None and link.conn.broken:
                        link.broke()
                raise
            if conn.changes:
                health.succeeded()
            return result

        # As on SQLite: a write once submitted runs even if its awaiter is canceled.
        return await lane.submit_here(call, min(priority, NORMAL))

    async def write_aside(self, fn: Callable[[Any], T]) -> T:
        """On a third writer connection: a 2 MB image takes tens of ms to commit, which job
        writes (and a fence check behind them) should not wait for."""
        return await self._submit(fn, _ASIDE, transaction=True)

    async def execute_write(
        self, sql: str, params: Iterable[Any] = (), *, priority: int = NORMAL
    ) -> int:
        values = tuple(params)
        return await self.run(lambda conn: conn.execute(sql, values).rowcount, priority=priority)

    async def fetchall(self, sql: str, params: Iterable[Any] = ()) -> list[Row]:
        return await self._fetchall(sql, params, binary=False)

    async def fetchall_binary(self, sql: str, params: Iterable[Any] = ()) -> list[Row]:
        return await self._fetchall(sql, params, binary=True)

    async def _fetchall(self, sql: str, params: Iterable[Any], *, binary: bool) -> list[Row]:
        pool = self._pool
        if pool is None:
            raise StoreError("database is not open")
        values = _params(tuple(params))
        text = translate(sql)

        def once() -> list[Row]:
            with pool.connection() as conn:
                rows: list[Row] = conn.cursor(binary=binary).execute(text, values).fetchall()
                conn._imagebot_used_at = time.monotonic()
                return rows

        def read() -> list[Row]:
            try:
                try:
                    return once()
                except psycopg.OperationalError:
                    # A recently used connection the server dropped since (restart): the pool
                    # discards it; once more on a fresh one (checked, as the pool connects).
                    return once()
            except PoolTimeout as exc:
                raise StoreUnavailable(
                    f"PostgreSQL at {self.address} is unreachable: {_first_line(exc)}"
                ) from exc

        return await asyncio.to_thread(read)

    def lock(self, conn: Any, key: str) -> None:
        conn.execute("SELECT pg_advisory_xact_lock(hashtext(?))", (key,))

    def plus_seconds_sql(self, expr: str, seconds: float) -> str:
        return f"({expr} + interval '{float(seconds):.6f} seconds')"
