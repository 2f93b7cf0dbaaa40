"""SQLite connections: WAL, busy_timeout, foreign keys; one writer thread, an aiosqlite reader.

Every write transaction runs whole, as one function, on a single writer thread: one hop from
the event loop and back. A transaction built from several awaited statements would hold
SQLite's write lock across event-loop turns, and under load every other write (the webhook's
save-before-ack first) would queue behind it. aiosqlite runs one statement per hop, so the
writer uses the standard library's sqlite3 on its own thread; reads (/jobs, /healthz,
counters for status messages) go through aiosqlite and, thanks to WAL, never wait for writes.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import queue
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable
from concurrent.futures import Future
from pathlib import Path
from typing import Any, TypeVar

import aiosqlite

from imagebot.clock import iso
from imagebot.errors import StoreError

T = TypeVar("T")


URGENT, NORMAL = 0, 1

# SQLite primary result codes that mean "the storage under the database failed" (disk full,
# I/O error, file-size limit, read-only or vanished file, locked by another process), as
# opposed to a bug in a statement (which stays a crash, not a fault to wait out).
_STORAGE_CODES = frozenset({5, 6, 7, 8, 10, 11, 13, 14, 15, 26})  # BUSY LOCKED NOMEM READONLY
# IOERR CORRUPT FULL CANTOPEN PROTOCOL NOTADB
_STORAGE_ERRNOS = frozenset({5, 27, 28, 30, 122})  # EIO EFBIG ENOSPC EROFS EDQUOT


def is_storage_fault(exc: BaseException) -> bool:
    """True when `exc` says the disk or the database file refused, not that the code erred."""
    if isinstance(exc, sqlite3.Error):
        code = getattr(exc, "sqlite_errorcode", None)
        if code is not None:
            return code & 0xFF in _STORAGE_CODES
        text = str(exc).lower()
        return any(word in text for word in ("disk", "i/o error", "locked", "readonly"))
    if isinstance(exc, OSError):
        return exc.errno in _STORAGE_ERRNOS
    return False


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


_Item = tuple[int, int, Callable[[], object] | None, "Future[object] | None"]


class _WriterThread:
    """One thread that runs submitted functions by priority, then in order of arrival."""

    def __init__(self) -> None:
        self._queue: queue.PriorityQueue[_Item] = queue.PriorityQueue()
        self._seq = itertools.count()
        self._thread = threading.Thread(target=self._main, name="sqlite-writer", daemon=True)
        self._thread.start()

    def submit(self, fn: Callable[[], T], priority: int) -> Future[T]:
        future: Future[T] = Future()
        self._queue.put((priority, next(self._seq), fn, future))  # type: ignore[arg-type]
        return future

    def _main(self) -> None:
        while True:
            _, _, fn, future = self._queue.get()
            if fn is None or future is None:
                return
            if not future.set_running_or_notify_cancel():
                continue
            try:
                future.set_result(fn())
            except BaseException as exc:  # handed to the awaiting task
                future.set_exception(exc)

    def stop(self) -> None:
        self._queue.put((NORMAL + 1, next(self._seq), None, None))  # after queued writes
        self._thread.join()


class Database:
    """Owns the connections. `write(fn)` runs `fn(conn)` in one transaction on the writer."""

    def __init__(self, path: Path, *, synchronous: str = "full") -> None:
        self.path = path
        self.synchronous = synchronous.upper()
        self._executor: _WriterThread | None = None
        self._writer: sqlite3.Connection | None = None
        self._reader: aiosqlite.Connection | None = None
        self.writes = WriteHealth()

    def _pragmas(self) -> list[str]:
        return [
            "PRAGMA busy_timeout=5000",
            "PRAGMA foreign_keys=ON",
            f"PRAGMA synchronous={self.synchronous}",
        ]

    def _connect_writer(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        conn.row_factory = sqlite3.Row
        conn.execute("PRAGMA journal_mode=WAL").fetchall()
        for pragma in self._pragmas():
            conn.execute(pragma).fetchall()
        self._writer = conn

    async def open(self) -> None:
        self._executor = _WriterThread()
        try:
            await self.run(lambda _: self._connect_writer(), connected=False)
            self._reader = await aiosqlite.connect(self.path, isolation_level=None)
            self._reader.row_factory = aiosqlite.Row
            for pragma in self._pragmas():
                async with self._reader.execute(pragma) as cursor:
                    await cursor.fetchall()
        except (OSError, sqlite3.Error) as exc:
            await self.close()
            raise StoreError(f"cannot open database {self.path}: {exc}") from exc

    async def close(self) -> None:
        if self._reader is not None:
            await self._reader.close()
            self._reader = None
        if self._executor is not None:
            if self._writer is not None:
                await asyncio.wrap_future(self._executor.submit(self._writer.close, NORMAL))
                self._writer = None
            await asyncio.to_thread(self._executor.stop)
            self._executor = None

    async def run(
        self,
        fn: Callable[[sqlite3.Connection], T],
        *,
        connected: bool = True,
        priority: int = NORMAL,
    ) -> T:
        """Run `fn(writer)` on the writer thread, outside any transaction (migrations)."""
        if self._executor is None or (connected and self._writer is None):
            raise StoreError("database is not open")

        health = self.writes

        def call() -> T:
            conn = self._writer
            before = conn.total_changes if conn is not None else 0
            try:
                result = fn(conn)  # type: ignore[arg-type]
            except BaseException as exc:
                if is_storage_fault(exc):
                    health.failed(exc)
                raise
            # Only a write that changed rows reached the disk: a claim of an empty queue
            # proves nothing about a full one.
            if conn is not None and conn.total_changes != before:
                health.succeeded()
            return result

        # Shielded: a write once submitted always runs, even if the awaiting task is canceled
        # (a shutdown must not drop, say, the vendor request id on its way to the row).
        return await asyncio.shield(asyncio.wrap_future(self._executor.submit(call, priority)))

    async def write(self, fn: Callable[[sqlite3.Connection], T], *, priority: int = NORMAL) -> T:
        """Run `fn(writer)` as one transaction: BEGIN IMMEDIATE … COMMIT, ROLLBACK if it raises.

        Callable from any event loop (the webhook intake has its own). Once submitted, the
        transaction runs even if the awaiting task is canceled. URGENT work (saving an update
        before Telegram is answered) goes ahead of queued job writes.
        """

        def transaction(conn: sqlite3.Connection) -> T:
            conn.execute("BEGIN IMMEDIATE")
            try:
                result = fn(conn)
                conn.execute("COMMIT")
            except BaseException:
                # A failed COMMIT (disk full, I/O error) may or may not have ended the
                # transaction; one left open would make every later BEGIN fail.
                if conn.in_transaction:
                    with contextlib.suppress(sqlite3.Error):  # the first error says more
                        conn.execute("ROLLBACK")
                raise
            return result

        return await self.run(transaction, priority=priority)

    async def execute_write(self, sql: str, params: Iterable[Any] = ()) -> int:
        """One statement in its own (autocommit) transaction; returns the rows changed."""
        values = tuple(params)
        return await self.run(lambda conn: conn.execute(sql, values).rowcount)

    async def probe_write(self) -> bool:
        """Rewrite the one-row write_probe table: does the database take writes now?"""
        stamp = iso()
        try:
            await self.execute_write(
                "INSERT INTO write_probe (id, written_at) VALUES (1, ?)"
                " ON CONFLICT (id) DO UPDATE SET written_at = excluded.written_at",
                (stamp,),
            )
        except (sqlite3.Error, OSError) as exc:
            if not is_storage_fault(exc):
                raise
            return False
        return True

    @property
    def reader(self) -> aiosqlite.Connection:
        if self._reader is None:
            raise StoreError("database is not open")
        return self._reader

    async def fetchone(self, sql: str, params: Iterable[Any] = ()) -> aiosqlite.Row | None:
        """The first row of a query that returns at most a few (by key, or an aggregate)."""
        rows = await self.fetchall(sql, params)
        return rows[0] if rows else None

    async def fetchall(self, sql: str, params: Iterable[Any] = ()) -> list[aiosqlite.Row]:
        # One hop to the reader thread (execute + fetch + close), not three.
        return list(await self.reader.execute_fetchall(sql, tuple(params)))

    async def is_healthy(self) -> bool:
        try:
            row = await self.fetchone("SELECT 1")
        except (sqlite3.Error, StoreError, ValueError):
            return False
        return row is not None
