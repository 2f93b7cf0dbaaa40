"""The SQLite store: WAL, busy_timeout, foreign keys; one writer thread, an aiosqlite reader.

Every write transaction runs whole, as one function, on a single writer thread: one hop from
the event loop and back. A transaction built from several awaited statements would hold
SQLite's write lock across event-loop turns, and under load every other write (the webhook's
save-before-ack first) would queue behind it. aiosqlite runs one statement per hop, so the
writer uses the standard library's sqlite3 on its own thread; reads (/jobs, /healthz,
counters for status messages) go through aiosqlite and, thanks to WAL, never wait for writes.

SQLite serves ONE bot process: `SqliteDatabase(path, exclusive=True)` (the bot's own store)
holds an exclusive advisory lock (flock) on `<database>.lock` beside the file from before the
database is opened until it is closed, and a second bot on the same file is refused before it
touches the database. The kernel drops the lock when the process dies (kill -9 leaves none
stale). The shell commands (`imagebot users`, `invite`) open the store without the lock: they
are meant to run beside the bot.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import itertools
import os
import queue
import sqlite3
import threading
from collections.abc import Callable, Iterable
from concurrent.futures import Future
from pathlib import Path
from typing import Any, TypeVar

import aiosqlite

from imagebot.errors import StoreError
from imagebot.store.db import NORMAL, Database, Row, WriteHealth, hand_back, is_storage_fault

T = TypeVar("T")


class StoreInUse(StoreError):
    """Another process holds the SQLite file's lock (`pid` when it could be read)."""

    def __init__(self, database: Path, pid: int | None) -> None:
        self.database = database
        self.pid = pid
        by = f" (pid {pid})" if pid else ""
        super().__init__(f"{database} is in use by another imagebot process{by}")


def lock_path(database: Path) -> Path:
    """The lock file of the SQLite database `database`: `<database>.lock` beside it."""
    return database.with_name(database.name + ".lock")


class ProcessLock:
    """An exclusive flock on `<database>.lock`, held from `acquire()` to `release()`.

    flock, not fcntl's record locks: SQLite's own POSIX locks on the database file are a
    different kind, and closing any descriptor of a file drops every POSIX lock the process
    holds on it. The holder's pid is written into the file for the refusal message.
    """

    def __init__(self, database: Path) -> None:
        self.database = database
        self.path = lock_path(database)
        self._fd: int | None = None

    def acquire(self) -> None:
        """Take the lock now or raise StoreInUse; StoreError if the file cannot be made."""
        if self._fd is not None:
            return
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise StoreError(
                f"cannot open database {self.database}: cannot create its lock file "
                f"{self.path}: {exc.strerror or exc}"
            ) from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            pid = _read_pid(fd)
            os.close(fd)
            raise StoreInUse(self.database, pid) from None
        except OSError as exc:
            os.close(fd)
            raise StoreError(f"cannot lock {self.path}: {exc.strerror or exc}") from exc
        with contextlib.suppress(OSError):  # the pid is a courtesy; the lock is what counts
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor drops the flock
            self._fd = None


def _read_pid(fd: int) -> int | None:
    try:
        text = os.pread(fd, 32, 0).decode("ascii", errors="replace").strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


_Item = tuple[int, int, Callable[[], None] | None]  # (priority, arrival, job); None: stop


class _WriterThread:
    """One thread that runs submitted functions by priority, then in order of arrival."""

    def __init__(self, name: str = "sqlite-writer") -> None:
        self._queue: queue.PriorityQueue[_Item] = queue.PriorityQueue()
        self._seq = itertools.count()
        self._thread = threading.Thread(target=self._main, name=name, daemon=True)
        self._thread.start()

    def submit(self, fn: Callable[[], T], priority: int) -> Future[T]:
        """Queue `fn`; its answer on a concurrent future (skipped if that is canceled first)."""
        future: Future[T] = Future()

        def job() -> None:
            if not future.set_running_or_notify_cancel():
                return
            try:
                future.set_result(fn())
            except BaseException as exc:  # handed to whoever waits on the future
                future.set_exception(exc)

        self._queue.put((priority, next(self._seq), job))
        return future

    def submit_here(self, fn: Callable[[], T], priority: int) -> asyncio.Future[T]:
        """Queue `fn`; its answer on a future of the running loop (db.hand_back: one turn
        sooner than a wrapped concurrent future). `fn` runs even if that is canceled."""
        loop = asyncio.get_running_loop()
        waiter: asyncio.Future[T] = loop.create_future()

        def job() -> None:
            try:
                result = fn()
            except BaseException as exc:  # handed to the awaiting task
                hand_back(loop, waiter, error=exc)
            else:
                hand_back(loop, waiter, result)

        self._queue.put((priority, next(self._seq), job))
        return waiter

    def _main(self) -> None:
        while True:
            _, _, job = self._queue.get()
            if job is None:
                return
            job()

    def stop(self) -> None:
        self._queue.put((NORMAL + 1, next(self._seq), None))  # after queued writes
        self._thread.join()


class SqliteDatabase(Database):
    """Owns the connections. `write(fn)` runs `fn(conn)` in one transaction on the writer."""

    dialect = "sqlite"

    def clock_sql(self, offset_s: float = 0.0) -> str:
        # the store's ISO text ("…T…sssZ"), so text comparison is time comparison
        return f"strftime('%Y-%m-%dT%H:%M:%fZ', 'now', '{float(offset_s):+.3f} seconds')"

    def __init__(
        self, path: str | Path, *, synchronous: str = "full", exclusive: bool = False
    ) -> None:
        self.path = Path(path)
        self.synchronous = synchronous.upper()
        # the bot's own store: one process per file (see the module docstring)
        self._process_lock = ProcessLock(self.path) if exclusive else None
        self._executor: _WriterThread | None = None
        self._writer: sqlite3.Connection | None = None
        self._reader: aiosqlite.Connection | None = None
        self.writes = WriteHealth()

    @property
    def where(self) -> str:
        return str(self.path)

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
        if self._process_lock is not None:
            self._process_lock.acquire()  # before the file is touched: StoreInUse if taken
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
        if self._process_lock is not None:
            self._process_lock.release()

    async def run(
        self,
        fn: Callable[[Any], T],
        *,
        priority: int = NORMAL,
        connected: bool = True,
    ) -> T:
        """Run `fn(writer)` on the writer thread, outside any transaction (migrations)."""
        if self._executor is None or (connected and self._writer is None):
            raise StoreError("database is not open")

        health = self.writes

        def call() -> T:
            conn = self._writer
            before = conn.total_changes if conn is not None else 0
            try:
                result = fn(conn)
            except BaseException as exc:
                if is_storage_fault(exc):
                    health.failed(exc)
                raise
            # Only a write that changed rows reached the disk: a claim of an empty queue
            # proves nothing about a full one.
            if conn is not None and conn.total_changes != before:
                health.succeeded()
            return result

        # A write once submitted always runs, even if the awaiting task is canceled (a
        # shutdown must not drop, say, the vendor request id on its way to the row).
        return await self._executor.submit_here(call, priority)

    async def write(self, fn: Callable[[Any], T], *, priority: int = NORMAL) -> T:
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

    async def execute_write(
        self, sql: str, params: Iterable[Any] = (), *, priority: int = NORMAL
    ) -> int:
        """One statement in its own (autocommit) transaction; returns the rows changed."""
        values = tuple(params)
        return await self.run(lambda conn: conn.execute(sql, values).rowcount, priority=priority)

    @property
    def reader(self) -> aiosqlite.Connection:
        if self._reader is None:
            raise StoreError("database is not open")
        return self._reader

    async def fetchall(self, sql: str, params: Iterable[Any] = ()) -> list[Row]:
        # One hop to the reader thread (execute + fetch + close), not three.
        return list(await self.reader.execute_fetchall(sql, tuple(params)))

    def plus_seconds_sql(self, expr: str, seconds: float) -> str:
        return f"strftime('%Y-%m-%dT%H:%M:%fZ', {expr}, '{float(seconds):+.6f} seconds')"
