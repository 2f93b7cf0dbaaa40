"""Report 7: imagebot on SQLite beside imagebot on PostgreSQL, same machine, same load.

A durable throw-away cluster (tests/pgcluster.py with `durable=True`: fsync on,
full_page_writes on, synchronous_commit on, the server's defaults) is started for the report
and removed after it; every PostgreSQL run gets a fresh database on it, every SQLite run a
fresh file, as the other reports do. The two stores take turns at each measurement, so a slow
spell of the shared host does not land on one store only.

Measured for each store: webhook ack p50/p99 at 50 and 200 updates/s, the highest sustained
rate (the same step-up and judgement as report 1), CPU per whole /generate job, and RSS idle
and with 100 running + 1,000 queued. On PostgreSQL the CPU of the server's processes is
measured too (the bot's store costs CPU there instead of in the bot process).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import psycopg

from bench.procs import Bot, cpu_seconds, run_load
from bench.scenarios import (
    ACK_P99_LIMIT_S,
    DEFAULT_RATES,
    STEP_BUDGET_S,
    STEP_RATES,
    Context,
    _ack_figures,
    _judge,
    _load_with_cpu,
    _wait_idle,
    measure_memory,
    memory_overrides,
)
from tests.pgcluster import Cluster, start_cluster

STORES = ("sqlite", "postgresql")
SETTINGS = (
    "server_version",
    "fsync",
    "synchronous_commit",
    "full_page_writes",
    "wal_sync_method",
    "wal_level",
    "shared_buffers",
)
E2E_RATE = 10.0  # /generate jobs per second for the CPU-per-job figure


def _server_pids(cluster: Cluster) -> list[int]:
    """The postmaster and every process it started (backends, WAL writer, checkpointer…)."""
    pid_file = cluster.data / "postmaster.pid"
    try:
        root = int(pid_file.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return []
    pids = [root]
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rpartition(")")[2].split()
        except OSError:
            continue
        if fields and int(fields[1]) == root:
            pids.append(int(stat.parent.name))
    return pids


def server_transactions(cluster: Cluster | None) -> int:
    """Transactions the server has finished so far, every database (0 for SQLite). Each
    statement a bot sends outside BEGIN … COMMIT is one: a count of the round trips an update
    costs that no noise on the machine changes. The statistics reach this view within the
    server's stats flush (about a second): read after the work has settled."""
    if cluster is None:
        return 0
    with psycopg.connect(cluster.url(), autocommit=True) as conn:
        row = conn.execute(
            "SELECT pg_stat_clear_snapshot(),"
            " sum(xact_commit + xact_rollback)::bigint FROM pg_stat_database"
        ).fetchone()
    return int(row[1]) if row is not None and row[1] is not None else 0


def server_cpu_seconds(cluster: Cluster | None) -> float:
    """User + system CPU the whole server has used so far (0 for SQLite: no server).

    A backend that exited in between takes its CPU with it; the bot keeps its connections
    open for its whole run, so only short-lived helpers can be missed."""
    if cluster is None:
        return 0.0
    total = 0.0
    for pid in _server_pids(cluster):
        with contextlib.suppress(OSError, ValueError, IndexError):
            total += cpu_seconds(pid)
    return total


def durability(cluster: Cluster) -> dict[str, str]:
    """The server settings that decide what a commit promises, as the server reports them."""
    import psycopg

    with psycopg.connect(cluster.url(), autocommit=True) as conn:
        return {
            name: str(conn.execute(f"SHOW {name}").fetchone()[0])  # type: ignore[index]
            for name in SETTINGS
        }


class Stores:
    """Where each store's fresh database comes from."""

    def __init__(self, ctx: Context, cluster: Cluster) -> None:
        self.ctx = ctx
        self.cluster = cluster

    @contextlib.asynccontextmanager
    async def bot(
        self, store: str, label: str, overrides: dict[str, Any] | None = None, **fake: Any
    ) -> AsyncIterator[Bot]:
        merged = dict(overrides or {})
        url = None
        if store == "postgresql":
            url = await asyncio.to_thread(self.cluster.create_db, "bench")
            merged["storage"] = {**merged.get("storage", {}), "database": url}
        try:
            async with self.ctx.imagebot(f"{store}-{label}", merged, **fake) as bot:
                yield bot
        finally:
            if url is not None:
                await asyncio.to_thread(self.cluster.drop_db, url)

    def server(self, store: str) -> Cluster | None:
        return self.cluster if store == "postgresql" else None


async def _fixed(stores: Stores, store: str, rate: int, duration: float) -> dict[str, Any]:
    ctx = stores.ctx
    count = int(rate * duration)
    async with stores.bot(store, f"ack-{rate}") as bot:
        server_before = server_cpu_seconds(stores.server(store))
        result, cpu = await _load_with_cpu(ctx, bot, ctx.spec(bot, rate, count))
        server = server_cpu_seconds(stores.server(store)) - server_before
    fig = _ack_figures(result)
    fig["cpu_ms_per_update"] = round(cpu / max(1, count) * 1000, 2)
    fig["server_cpu_ms_per_update"] = round(server / max(1, count) * 1000, 2)
    fig["cores"] = result["cores"]
    return fig


async def _step_up(stores: Stores, store: str, step_s: float) -> dict[str, Any]:
    """Report 1's step-up (same rates, budget, retry and judgement) for one store."""
    ctx = stores.ctx
    steps: list[dict[str, Any]] = []
    best, unjudged = 0, 0
    stopped_by = "top rate"
    started = time.monotonic()
    for rate in STEP_RATES:
        if time.monotonic() - started > STEP_BUDGET_S:
            stopped_by = "time budget"
            break
        count = int(rate * step_s)
        tries: list[str] = []
        verdict, fig = "fail", {}
        for attempt in range(2):
            async with stores.bot(store, f"step-{rate}-{attempt}") as bot:
                result, _ = await _load_with_cpu(ctx, bot, ctx.spec(bot, rate, count))
            fig = _ack_figures(result)
            verdict = _judge(fig)
            tries.append(f"{verdict} p99 {fig['p99_ms']}")
            if verdict == "pass":
                break
        steps.append({"rate": rate, "verdict": verdict, "p99_ms": fig["p99_ms"], "tries": tries})
        if verdict == "pass":
            best, unjudged = rate, 0
            continue
        unjudged += 1
        if verdict == "fail" or unjudged >= 2:
            stopped_by = verdict
            break
    return {"steps": steps, "max_sustained_rate": best, "step_up_stopped_by": stopped_by}


async def _cpu_per_job(stores: Stores, store: str) -> dict[str, Any]:
    """Whole /generate jobs at E2E_RATE/s until every one is delivered: CPU per job."""
    ctx = stores.ctx
    count = int(E2E_RATE * ctx.seconds(10))
    async with stores.bot(store, "e2e") as bot:
        before = cpu_seconds(bot.pid)
        server_before = server_cpu_seconds(stores.server(store))
        await run_load(ctx.spec(bot, E2E_RATE, count))
        await _wait_idle(bot, 40)
        total = cpu_seconds(bot.pid) - before
        server = server_cpu_seconds(stores.server(store)) - server_before
        delivered = sum(1 for m in await ctx.fakes.sent() if m["kind"] == "photo")
    jobs = max(1, delivered)
    return {
        "jobs": count,
        "delivered": delivered,
        "cpu_ms_per_job": round(total / jobs * 1000, 1),
        "server_cpu_ms_per_job": round(server / jobs * 1000, 1),
    }


async def _memory(stores: Stores, store: str) -> dict[str, Any]:
    """Report 4's RSS figures for one store (100 running + 1,000 queued)."""
    async with stores.bot(store, "memory", memory_overrides(), replicate_latency_s=300.0) as bot:
        return await measure_memory(stores.ctx, bot)


@contextlib.contextmanager
def _cluster() -> Iterator[Cluster]:
    cluster = start_cluster(durable=True)
    if cluster is None:
        raise RuntimeError(
            "report postgresql needs PostgreSQL's server binaries: apt-get install -y postgresql"
        )
    try:
        yield cluster
    finally:
        cluster.destroy()


async def report_postgresql(ctx: Context) -> dict[str, Any]:
    """Report 7: the figures above for both stores, taking turns."""
    with _cluster() as cluster:
        stores = Stores(ctx, cluster)
        out: dict[str, Any] = {"durability": durability(cluster), "stores": {}}
        figures: dict[str, dict[str, Any]] = {s: {"fixed": {}} for s in STORES}
        duration = ctx.seconds(4)
        for rate in DEFAULT_RATES:
            for store in STORES:
                figures[store]["fixed"][str(rate)] = await _fixed(stores, store, rate, duration)
        for store in STORES:
            figures[store].update(await _step_up(stores, store, ctx.seconds(3)))
        for store in STORES:
            figures[store]["end_to_end"] = await _cpu_per_job(stores, store)
        for store in STORES:
            figures[store]["memory"] = await _memory(stores, store)
        out["stores"] = figures
    sqlite_p99 = figures["sqlite"]["fixed"]["200"].get("p99_ms")
    pg_p99 = figures["postgresql"]["fixed"]["200"].get("p99_ms")
    out["ack_p99_200_ratio"] = round(pg_p99 / sqlite_p99, 2) if sqlite_p99 and pg_p99 else None
    out["sustained_limit_ms"] = ACK_P99_LIMIT_S * 1000
    return out
