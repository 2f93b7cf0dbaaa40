"""imagebot with counters around its SQLite use, for the profile phase only.

`python -m bench.instrumented <imagebot arguments>` runs imagebot's own `cli.main` after
wrapping (never editing) a few functions from the outside:

- every aiosqlite round trip (a call handed to the connection's thread and awaited back);
- `Database.transaction` / `Database.execute_write`: time spent waiting for the single write
  lock and time holding it, per call site (inbox save, job create, claim, update, ...).

At exit the counters are written as JSON to $BENCH_INSTRUMENT_OUT. The figures of the
reports never come from this wrapper: only the profile's explanations do.

$BENCH_WHAT_IF (comma-separated) applies a proposed change from the outside, to measure its
effect before anyone edits imagebot:
- `aiohttp-telegram`: PTB's Bot API requests go through aiohttp instead of httpx.
"""

from __future__ import annotations

import atexit
import contextvars
import functools
import json
import os
import sys
import time
from collections import defaultdict
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
import aiosqlite.core
from telegram.request import BaseRequest, RequestData

from imagebot import cli
from imagebot.store import db as db_module
from imagebot.store.inbox import Inbox
from imagebot.store.jobs import JobStore

_site: contextvars.ContextVar[str] = contextvars.ContextVar("site", default="other")
_counts: dict[str, Any] = {
    "round_trips": defaultdict(int),
    "round_trip_s": defaultdict(float),
    "lock_wait_s": defaultdict(list),
    "lock_hold_s": defaultdict(list),
}


def _wrap_site(cls: type, name: str) -> None:
    original = getattr(cls, name)
    label = f"{cls.__name__}.{name}"

    @functools.wraps(original)
    async def wrapper(*args: Any, **kwargs: Any) -> Any:
        token = _site.set(label)
        try:
            return await original(*args, **kwargs)
        finally:
            _site.reset(token)

    setattr(cls, name, wrapper)


def _install() -> None:
    original_execute = aiosqlite.core.Connection._execute

    async def _execute(self: Any, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        site = _site.get()
        _counts["round_trips"][site] += 1
        started = time.perf_counter()
        try:
            return await original_execute(self, fn, *args, **kwargs)  # type: ignore[no-untyped-call]
        finally:
            _counts["round_trip_s"][site] += time.perf_counter() - started

    aiosqlite.core.Connection._execute = _execute  # type: ignore[method-assign]

    @asynccontextmanager
    async def transaction(self: db_module.Database) -> AsyncIterator[aiosqlite.Connection]:
        site = _site.get()
        asked = time.perf_counter()
        async with self._write_lock:
            got = time.perf_counter()
            _counts["lock_wait_s"][site].append(got - asked)
            try:
                conn = self.writer
                await conn.execute("BEGIN IMMEDIATE")
                try:
                    yield conn
                except BaseException:
                    await conn.execute("ROLLBACK")
                    raise
                await conn.execute("COMMIT")
            finally:
                _counts["lock_hold_s"][site].append(time.perf_counter() - got)

    async def execute_write(self: db_module.Database, sql: str, params: Any = ()) -> int:
        site = _site.get()
        asked = time.perf_counter()
        async with self._write_lock:
            got = time.perf_counter()
            _counts["lock_wait_s"][site].append(got - asked)
            try:
                cursor = await self.writer.execute(sql, tuple(params))
                return int(cursor.rowcount)
            finally:
                _counts["lock_hold_s"][site].append(time.perf_counter() - got)

    db_module.Database.transaction = transaction  # type: ignore[method-assign]
    db_module.Database.execute_write = execute_write  # type: ignore[method-assign]
    for cls, name in (
        (Inbox, "save"),
        (Inbox, "mark_processed"),
        (JobStore, "create"),
        (JobStore, "claim_next"),
        (JobStore, "update"),
        (JobStore, "get"),
        (JobStore, "counts"),
        (JobStore, "queue_position"),
        (JobStore, "queue_positions"),
        (JobStore, "by_ids"),
    ):
        _wrap_site(cls, name)


class AiohttpRequest(BaseRequest):
    """A PTB request class on aiohttp (what-if `aiohttp-telegram`); timeouts simplified."""

    def __init__(self, connection_pool_size: int = 128, read_timeout: float = 20.0, **_: Any):
        self._limit = connection_pool_size
        self._timeout = read_timeout
        self._session: aiohttp.ClientSession | None = None

    @property
    def read_timeout(self) -> float | None:
        return self._timeout

    async def initialize(self) -> None:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=self._limit),
                timeout=aiohttp.ClientTimeout(total=self._timeout + 10),
            )

    async def shutdown(self) -> None:
        if self._session is not None:
            await self._session.close()

    async def do_request(
        self,
        url: str,
        method: str,
        request_data: RequestData | None = None,
        read_timeout: Any = BaseRequest.DEFAULT_NONE,
        write_timeout: Any = BaseRequest.DEFAULT_NONE,
        connect_timeout: Any = BaseRequest.DEFAULT_NONE,
        pool_timeout: Any = BaseRequest.DEFAULT_NONE,
    ) -> tuple[int, bytes]:
        assert self._session is not None
        data: Any = None
        if request_data is not None:
            files = request_data.multipart_data
            if files:
                form = aiohttp.FormData()
                for key, value in request_data.json_parameters.items():
                    form.add_field(key, value)
                for key, (name, content, mime) in files.items():
                    form.add_field(key, content, filename=name, content_type=mime)
                data = form
            else:
                data = request_data.json_parameters
        async with self._session.request(method, url, data=data) as resp:
            return resp.status, await resp.read()


def _what_if() -> None:
    wanted = {w for w in os.environ.get("BENCH_WHAT_IF", "").split(",") if w}
    if "aiohttp-telegram" in wanted:
        from imagebot import app

        app.HTTPXRequest = AiohttpRequest  # type: ignore[attr-defined,assignment]


def _pct(values: list[float], q: float) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q / 100 * len(ordered)))]


def _dump() -> None:
    out = os.environ.get("BENCH_INSTRUMENT_OUT")
    if not out:
        return
    locks = {}
    for site, waits in _counts["lock_wait_s"].items():
        holds = _counts["lock_hold_s"][site]
        locks[site] = {
            "n": len(waits),
            "wait_p50_ms": round(_pct(waits, 50) * 1000, 2),
            "wait_p99_ms": round(_pct(waits, 99) * 1000, 2),
            "hold_p50_ms": round(_pct(holds, 50) * 1000, 2),
            "hold_p99_ms": round(_pct(holds, 99) * 1000, 2),
            "hold_total_s": round(sum(holds), 3),
        }
    data = {
        "round_trips": dict(_counts["round_trips"]),
        "round_trip_total_s": {k: round(v, 3) for k, v in _counts["round_trip_s"].items()},
        "write_lock": locks,
    }
    Path(out).write_text(json.dumps(data, indent=2))


def main() -> int:
    """Install the counters, then run imagebot's CLI with the given arguments."""
    _install()
    _what_if()
    atexit.register(_dump)
    return cli.main(sys.argv[1:])


if __name__ == "__main__":
    sys.exit(main())
