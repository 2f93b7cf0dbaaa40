"""imagebot with counters around its store, threads, event loops and GC: for the profile
phase and the experiments only.

`python -m bench.research.instrumented <imagebot arguments>` runs imagebot's own `cli.main` after
wrapping (never editing) a few functions from the outside:

- writer thread: every `Database.run` (so every `write` and `execute_write`: all the work of
  the `sqlite-writer` thread), per call site: the queue wait (submitted → started on the
  writer thread), the run time on the writer thread, and the hand-back (finished → the
  awaiting coroutine resumed: that loop's latency plus the wait for the GIL), with the
  writer queue's depth at submit time;
- reads: every aiosqlite round trip (the reader connection's thread), per call site;
- event loops: the lag of the main loop and of the webhook thread's loop (a 10 ms ticker on
  each, started once the bot is ready);
- GC: every collection's pause, per generation (`gc.callbacks`);
- threads: CPU time per thread (user + system from /proc/self/task, sampled every 0.5 s);
- webhook: the route's own time (handler start → response).

Timestamped events (each update's save, GC pauses, loop stalls over 5 ms) are kept too, so
a slow acknowledgement can be matched with what happened at that moment. At exit everything
is written as JSON to $BENCH_INSTRUMENT_OUT. With $BENCH_INSTRUMENT=off nothing is counted
and only the what-ifs below apply (a what-if measured without the counters' overhead). The
figures of the reports never come from this wrapper: only the profile's explanations and the
experiments (bench/research/experiments.py) do.

$BENCH_WHAT_IF (comma-separated) applies a change from the outside, to measure its effect
before anyone edits imagebot:
- `gc-freeze`: `gc.freeze()` once the bot is ready (start-up objects leave the collector);
- `gc-off`: `gc.disable()` once ready (a bound on what GC tuning can give; memory grows);
- `settle-in-background`: after a result is delivered, the job's slot is freed at once and
  its status message is removed by a background task (`JobRunner._settle` of a succeeded job
  returns immediately), instead of the slot waiting for that low-priority deletion;
- `no-queued-edit`: `Progress.show_queued` does nothing (stands in for sending the status
  message with its place in line, instead of "Generating…" and then an edit);
- `deletes-not-low`: deleteMessage leaves the 30% progress share (it still takes a token of
  the overall budget);
- `deletes-free`: deleteMessage is not rate limited at all (a bound: what the sends alone
  would take).
"""

from __future__ import annotations

import asyncio
import atexit
import contextvars
import functools
import gc
import json
import os
import sqlite3
import sys
import threading
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import aiosqlite.core

from bench.stats import percentile
from imagebot import cli, threaded_site
from imagebot.intake import Intake
from imagebot.store import db as db_module
from imagebot.store import migrate, usage
from imagebot.store.inbox import Inbox
from imagebot.store.jobs import JobStore
from imagebot.store.sqlite import SqliteDatabase

T = TypeVar("T")

TICK_S = 0.010  # loop-lag ticker period
STALL_S = 0.005  # loop lags above this are kept as timestamped events
THREAD_SAMPLE_S = 0.5
MAX_EVENTS = 200_000  # a bound on every list kept in memory

_site: contextvars.ContextVar[str] = contextvars.ContextVar("site", default="other")
_lock = threading.Lock()
# writer: (site, loop thread, priority, queue depth, wall submitted, wait, run, hand-back)
_writes: list[tuple[str, str, int, int, float, float, float, float]] = []
_reads: dict[str, list[float]] = defaultdict(list)
_lags: dict[str, list[float]] = defaultdict(list)
_stalls: list[tuple[str, float, float]] = []  # (loop, wall at end, lag)
_gc_pauses: list[tuple[int, float, float, int, str]] = []  # (gen, wall, pause, collected, thread)
_gc_started = [0.0]
_route_s: list[float] = []
_thread_cpu: dict[int, tuple[str, float]] = {}  # native id → (name, CPU seconds)
_started_wall = time.time()
_ready_wall = [0.0]


def _bounded_append(items: list[Any], item: Any) -> None:
    if len(items) < MAX_EVENTS:
        items.append(item)


# -- call sites --------------------------------------------------------------------------------


def _label(name: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> str:
    """A call site's name; JobStore.update and finish also say what they write."""
    if name == "JobStore.update":
        keys = sorted(k for k in kwargs if k != "expect")
        phase = kwargs.get("phase")
        suffix = f" phase={getattr(phase, 'value', phase)}" if phase is not None else ""
        return f"{name}[{','.join(k for k in keys if k != 'phase')}]{suffix}"
    if name == "JobStore.finish" and len(args) > 2:
        return f"{name}[{getattr(args[2], 'value', args[2])}]"
    return name


def _wrap_site(owner: Any, attr: str, name: str) -> None:
    """Label every store call made inside `owner.attr` (the outermost labelled call wins)."""
    original = getattr(owner, attr)

    @functools.wraps(original)
    async def wrapper(*args: Any, **kwargs: Any) -> Any:
        if _site.get() != "other":
            return await original(*args, **kwargs)
        token = _site.set(_label(name, args, kwargs))
        try:
            return await original(*args, **kwargs)
        finally:
            _site.reset(token)

    setattr(owner, attr, wrapper)


def _install_sites() -> None:
    for cls, attr in (
        (Inbox, "save"),
        (Inbox, "mark_processed"),
        (Inbox, "prune"),
        (Inbox, "unprocessed"),
        (JobStore, "create"),
        (JobStore, "claim_next"),
        (JobStore, "finish"),
        (JobStore, "update"),
        (JobStore, "get"),
        (JobStore, "counts"),
        (JobStore, "queue_position"),
        (JobStore, "queue_positions"),
        (JobStore, "by_ids"),
        (JobStore, "by_status"),
        (JobStore, "overdue"),
        (JobStore, "unsettled"),
        (JobStore, "prune"),
        (JobStore, "with_results_older_than"),
    ):
        _wrap_site(cls, attr, f"{cls.__name__}.{attr}")
    _wrap_site(usage, "claim_notice", "usage.claim_notice")
    _wrap_site(migrate, "migrate", "migrate")


# -- the writer thread and the reader --------------------------------------------------------


def _install_writer() -> None:
    # SQLite's writer thread is what these counters explain (PostgreSQL has a pool).
    original_run = SqliteDatabase.run

    async def run(
        self: SqliteDatabase,
        fn: Callable[[sqlite3.Connection], T],
        *,
        connected: bool = True,
        priority: int = db_module.NORMAL,
    ) -> T:
        site = _site.get()
        loop_thread = threading.current_thread().name
        executor = self._executor
        depth = executor._queue.qsize() if executor is not None else 0
        wall = time.time()
        marks = [time.perf_counter(), 0.0, 0.0]

        def timed(conn: sqlite3.Connection) -> T:
            marks[1] = time.perf_counter()
            try:
                return fn(conn)
            finally:
                marks[2] = time.perf_counter()

        try:
            return await original_run(self, timed, connected=connected, priority=priority)
        finally:
            resumed = time.perf_counter()
            if marks[2]:
                item = (
                    site,
                    loop_thread,
                    priority,
                    depth,
                    wall,
                    marks[1] - marks[0],
                    marks[2] - marks[1],
                    resumed - marks[2],
                )
                with _lock:
                    _bounded_append(_writes, item)

    SqliteDatabase.run = run  # type: ignore[method-assign]

    original_execute = aiosqlite.core.Connection._execute

    async def _execute(self: Any, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        site = _site.get()
        started = time.perf_counter()
        try:
            return await original_execute(self, fn, *args, **kwargs)  # type: ignore[no-untyped-call]
        finally:
            _bounded_append(_reads[site], time.perf_counter() - started)

    aiosqlite.core.Connection._execute = _execute  # type: ignore[method-assign]


# -- loops, webhook route, GC, threads ---------------------------------------------------------


async def _ticker(name: str) -> None:
    lags = _lags[name]
    while True:
        asked = time.perf_counter()
        await asyncio.sleep(TICK_S)
        lag = time.perf_counter() - asked - TICK_S
        _bounded_append(lags, lag)
        if lag > STALL_S:
            _bounded_append(_stalls, (name, time.time(), lag))


_tickers: set[asyncio.Task[None]] = set()


def _start_ticker() -> None:
    task = asyncio.get_running_loop().create_task(_ticker(threading.current_thread().name))
    _tickers.add(task)
    task.add_done_callback(_tickers.discard)


def _install_ready_hook(what_if: set[str], *, ticker: bool) -> None:
    """Once the bot is ready (intake started, on the main loop): the ticker, the GC what-ifs."""
    original_start = Intake.start

    async def start(self: Intake) -> None:
        await original_start(self)
        _ready_wall[0] = time.time()
        if ticker:
            _start_ticker()
        if "gc-freeze" in what_if:
            gc.collect()
            gc.freeze()
        if "gc-off" in what_if:
            gc.disable()

    Intake.start = start  # type: ignore[method-assign]


def _install_loops() -> None:
    original_listen = threaded_site.ThreadedSite._listen

    async def listen(self: threaded_site.ThreadedSite) -> None:
        await original_listen(self)
        _start_ticker()

    threaded_site.ThreadedSite._listen = listen  # type: ignore[method-assign]

    original_webhook = Intake._webhook

    async def webhook(self: Intake, request: Any) -> Any:
        started = time.perf_counter()
        try:
            return await original_webhook(self, request)
        finally:
            _bounded_append(_route_s, time.perf_counter() - started)

    Intake._webhook = webhook  # type: ignore[method-assign]


def _on_gc(phase: str, info: dict[str, Any]) -> None:
    if phase == "start":
        _gc_started[0] = time.perf_counter()
        return
    pause = time.perf_counter() - _gc_started[0]
    item = (
        int(info["generation"]),
        time.time(),
        pause,
        int(info.get("collected", 0)),
        threading.current_thread().name,
    )
    _bounded_append(_gc_pauses, item)


def _thread_sampler() -> None:
    ticks = os.sysconf("SC_CLK_TCK")
    while True:
        names = {t.native_id: t.name for t in threading.enumerate() if t.native_id is not None}
        for entry in Path("/proc/self/task").iterdir():
            tid = int(entry.name)
            try:
                fields = (entry / "stat").read_text().rpartition(")")[2].split()
            except OSError:
                continue
            cpu = (int(fields[11]) + int(fields[12])) / ticks
            old_name = _thread_cpu.get(tid, ("", 0.0))[0]
            _thread_cpu[tid] = (names.get(tid) or old_name or f"native-{tid}", cpu)
        time.sleep(THREAD_SAMPLE_S)


def _what_if(wanted: set[str]) -> None:
    if "settle-in-background" in wanted:
        _settle_in_background()
    if "no-queued-edit" in wanted:
        from imagebot.progress import Progress

        async def show_queued(
            self: Progress, job: Any, position: int, *, force: bool = False
        ) -> None:
            return None

        Progress.show_queued = show_queued  # type: ignore[method-assign]
    if "deletes-not-low" in wanted:
        from imagebot import ratelimit

        ratelimit.LOW_PRIORITY_METHODS = ratelimit.LOW_PRIORITY_METHODS - {"deleteMessage"}
    if "deletes-free" in wanted:
        from imagebot import ratelimit

        ratelimit.UNLIMITED_METHODS = ratelimit.UNLIMITED_METHODS | {"deleteMessage"}


def _settle_in_background() -> None:
    from imagebot.models import JobStatus
    from imagebot.pipeline import Pipeline

    original = Pipeline.settle
    pending: set[asyncio.Task[None]] = set()

    async def settle(self: Pipeline, job: Any) -> None:
        if job.status is JobStatus.SUCCEEDED:
            task = asyncio.get_running_loop().create_task(original(self, job))
            pending.add(task)
            task.add_done_callback(pending.discard)
            return
        await original(self, job)

    Pipeline.settle = settle  # type: ignore[method-assign]


# -- the dump ----------------------------------------------------------------------------------


def _pct(values: list[float], q: float) -> float:
    return percentile(values, q) or 0.0


def _ms(value: float) -> float:
    return round(value * 1000, 3)


def _spread(values: list[float]) -> dict[str, float]:
    return {
        "p50_ms": _ms(_pct(values, 50)),
        "p99_ms": _ms(_pct(values, 99)),
        "max_ms": _ms(max(values, default=0.0)),
    }


def _writer_summary() -> dict[str, Any]:
    by_site: dict[str, list[tuple[str, str, int, int, float, float, float, float]]] = defaultdict(
        list
    )
    for item in _writes:
        by_site[item[0]].append(item)
    sites = {}
    for site, items in sorted(by_site.items(), key=lambda kv: -len(kv[1])):
        runs = [i[6] for i in items]
        sites[site] = {
            "n": len(items),
            "loop": sorted({i[1] for i in items}),
            "wait": _spread([i[5] for i in items]),
            "run": {**_spread(runs), "total_s": round(sum(runs), 3)},
            "hand_back": _spread([i[7] for i in items]),
            "queue_depth_p99": _pct([float(i[3]) for i in items], 99),
        }
    busy = sum(i[6] for i in _writes)
    return {"sites": sites, "run_total_s": round(busy, 3)}


def _dump() -> None:
    out = os.environ.get("BENCH_INSTRUMENT_OUT")
    if not out:
        return
    ended = time.time()
    threads: dict[str, float] = defaultdict(float)
    for name, cpu in _thread_cpu.values():
        key = name.split(" (")[0] if name.startswith("Thread-") else name
        if "_connection_worker_thread" in name:
            key = "aiosqlite reader"
        threads[key] += cpu
    gens: dict[int, list[float]] = defaultdict(list)
    for gen, _, pause, _, _ in _gc_pauses:
        gens[gen].append(pause)
    data = {
        "wall": {"started": _started_wall, "ready": _ready_wall[0], "ended": ended},
        "writer": _writer_summary(),
        "reads": {
            site: {"n": len(v), "total_s": round(sum(v), 3), **_spread(v)}
            for site, v in sorted(_reads.items(), key=lambda kv: -len(kv[1]))
        },
        "loops": {name: {"n": len(v), **_spread(v)} for name, v in _lags.items()},
        "gc": {
            str(gen): {"n": len(v), "total_s": round(sum(v), 3), **_spread(v)}
            for gen, v in sorted(gens.items())
        },
        "gc_threshold": list(gc.get_threshold()),
        "thread_cpu_s": {
            k: round(v, 2) for k, v in sorted(threads.items(), key=lambda kv: -kv[1])
        },
        "webhook_route": {"n": len(_route_s), **_spread(_route_s)},
        "events": {
            "saves": [
                [round(i[4], 4), _ms(i[5]), _ms(i[6]), _ms(i[7]), i[3]]
                for i in _writes
                if i[0] == "Inbox.save"
            ],
            "gc": [[g, round(w, 4), _ms(p), c, t] for g, w, p, c, t in _gc_pauses],
            "stalls": [[n, round(w, 4), _ms(lag)] for n, w, lag in _stalls],
        },
    }
    Path(out).write_text(json.dumps(data))


def main() -> int:
    """Install the counters, then run imagebot's CLI with the given arguments."""
    wanted = {w.strip() for w in os.environ.get("BENCH_WHAT_IF", "").split(",") if w.strip()}
    counters = os.environ.get("BENCH_INSTRUMENT", "on") != "off"
    _what_if(wanted)
    _install_ready_hook(wanted, ticker=counters)
    if counters:
        _install_sites()
        _install_writer()
        _install_loops()
        gc.callbacks.append(_on_gc)
        sampler = threading.Thread(
            target=_thread_sampler, name="bench-thread-sampler", daemon=True
        )
        sampler.start()
        atexit.register(_dump)
    return cli.main(sys.argv[1:])


if __name__ == "__main__":
    sys.exit(main())
