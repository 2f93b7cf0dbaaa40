"""Report 8: one process or two on one store (issue 16), same machine, same load.

Three set-ups take turns at each measurement: SQLite x 1 process, PostgreSQL x 1 and
PostgreSQL x 2 processes on one database (a durable throw-away cluster, as report 7's). The
load generator sends request i to process i mod N (a round-robin balancer's view). Measured:

- jobs completed per second at saturation: /generate updates offered faster than the bot can
  finish them, the fake provider answering after a fixed 0.1 s, `runner.max_running` far above
  what is ever running and `replicate.max_requests_per_s` far above what is ever asked (the
  bot, not a cap, is the limit); the rate is taken over the middle
  80 % of the photos' arrivals (the whole-run rate is reported beside it);
- update → first reply (the chat's first sendMessage at the fake Telegram) p50/p99 and webhook
  ack p99 at 200 updates/s, default settings; on PostgreSQL also the server's transactions
  per update over that run (each autocommit statement is one: the round trips an update
  costs, a figure the machine's noise does not move), and what the load left of the
  machine: its busy share, and how long each bot's main thread (its event loop) ran and how
  long it waited, ready, for a CPU.

Duplicates (a prompt created twice at the provider, a photo sent twice) are counted and
reported, never hidden: with more than one process they are what a broken claim looks like.
A set-up that fails to start or run is reported as failed with its error; the rest still run.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from bench.postgresql import _cluster, server_cpu_seconds, server_transactions
from bench.procs import (
    BenchError,
    Bot,
    cpu_seconds,
    machine_busy_seconds,
    main_thread_schedule,
    run_load,
    start_imagebot,
)
from bench.scenarios import LATENCY_JITTER_S, Context, _ack_figures, _reply_latency
from tests.pgcluster import Cluster
from tests.support import deep_merge

SETUPS: tuple[tuple[str, int], ...] = (("sqlite", 1), ("postgresql", 1), ("postgresql", 2))
SATURATION_RATE = 200.0  # offered /generate updates a second (above one process's job rate)
SATURATION_LATENCY_S = 0.1  # the fake provider's fixed answer time at saturation
SATURATION_MAX_RUNNING = 1000  # never reached: the bot is the limit
# Replicate calls a second each process may make (default 40: two calls a job, so 20 jobs/s
# per process): raised, or the saturation figures measure this cap, not the bot
SATURATION_VENDOR_RATE = 10_000
REPLY_RATE = 200
TARGET_SCALE = 1.6  # PostgreSQL x 2 jobs/s >= 1.6 x PostgreSQL x 1
TARGET_REPLY_P99_MS = 1000.0  # update -> first reply p99 at 200/s with 2 processes
STATS_FLUSH_S = 1.5  # PostgreSQL's statistics reach pg_stat_database within about a second


def label(store: str, procs: int) -> str:
    return f"{store} x{procs}"


class Setups:
    """Starts N imagebot processes on one fresh store (a fresh database for each run)."""

    def __init__(self, ctx: Context, cluster: Cluster) -> None:
        self.ctx = ctx
        self.cluster = cluster

    def server(self, store: str) -> Cluster | None:
        return self.cluster if store == "postgresql" else None

    @contextlib.asynccontextmanager
    async def bots(
        self,
        store: str,
        procs: int,
        name: str,
        overrides: dict[str, Any] | None = None,
        **fake: Any,
    ) -> AsyncIterator[list[Bot]]:
        ctx = self.ctx
        await ctx.fakes.reset()
        config: dict[str, Any] = {
            "replicate_latency_s": ctx.provider_latency_s,
            "fal_latency_s": ctx.provider_latency_s,
            "latency_jitter_s": LATENCY_JITTER_S,
            "image_size": [64, 64],
            "flood": False,
        }
        await ctx.fakes.configure(**{**config, **fake})
        merged = dict(overrides or {})
        url = None
        if store == "postgresql":
            url = await asyncio.to_thread(self.cluster.create_db, "bench")
            merged = deep_merge(merged, {"storage": {"database": url}})
        dirs = [ctx.new_dir(f"{name}-{store}{procs}-{n}") for n in range(procs)]
        started = await asyncio.gather(
            *(start_imagebot(ctx.fakes, d, merged) for d in dirs), return_exceptions=True
        )
        bots = [b for b in started if isinstance(b, Bot)]
        try:
            for outcome in started:
                if isinstance(outcome, BaseException):
                    raise outcome
            for bot in bots:
                ctx.startups.append(bot.ready_s)
            yield bots
        finally:
            for bot in bots:
                await bot.stop()
            if url is not None:
                await asyncio.to_thread(self.cluster.drop_db, url)


def _spec_for(ctx: Context, bots: list[Bot], rate: float, count: int) -> Any:
    """A load aimed at every process in turn (request i to process i mod N)."""
    return ctx.spec(bots[0], rate, count, urls=[b.webhook_url for b in bots])


async def _photos(
    ctx: Context, prefix: str, total: int, within: float, stall_s: float
) -> list[dict[str, Any]]:
    """The photos (captions starting with `prefix`) once `total` arrived, or none arrived for
    `stall_s`, or after `within` seconds."""
    deadline = time.monotonic() + within
    last_change, seen = time.monotonic(), -1
    photos: list[dict[str, Any]] = []
    while time.monotonic() < deadline:
        photos = [
            m
            for m in await ctx.fakes.sent()
            if m["kind"] == "photo" and (m["caption"] or "").startswith(prefix)
        ]
        unique = len({p["caption"] for p in photos})
        if unique >= total:
            break
        if unique != seen:
            seen, last_change = unique, time.monotonic()
        elif time.monotonic() - last_change > stall_s:
            break
        await asyncio.sleep(0.5)
    return photos


async def _saturation(setups: Setups, store: str, procs: int) -> dict[str, Any]:
    ctx = setups.ctx
    count = int(SATURATION_RATE * ctx.seconds(3))
    overrides = {
        "runner": {"max_running": SATURATION_MAX_RUNNING},
        "replicate": {"max_requests_per_s": SATURATION_VENDOR_RATE},
    }
    fake = {"replicate_latency_s": SATURATION_LATENCY_S, "latency_jitter_s": 0.0}
    async with setups.bots(store, procs, "saturation", overrides, **fake) as bots:
        spec = _spec_for(ctx, bots, SATURATION_RATE, count)
        cpu_before = sum(cpu_seconds(b.pid) for b in bots)
        server_before = server_cpu_seconds(setups.server(store))
        result = await run_load(spec)
        prefix = f"bench {spec.tag} "
        photos = await _photos(ctx, prefix, count, within=ctx.seconds(240), stall_s=15)
        cpu = sum(cpu_seconds(b.pid) for b in bots) - cpu_before
        server = server_cpu_seconds(setups.server(store)) - server_before
        creates = [p["prompt"] for p in await ctx.fakes.predictions()]
        problems = sum(len(b.log_problems()) for b in bots)
    firsts: dict[str, float] = {}
    for p in photos:
        firsts[p["caption"]] = min(firsts.get(p["caption"], p["sent_at"]), p["sent_at"])
    times = sorted(firsts.values())
    ours = [c for c in creates if c.startswith(prefix)]
    out: dict[str, Any] = {
        "offered": count,
        "offered_rate": SATURATION_RATE,
        "acked": sum(1 for r in result["records"] if r["status"] == 200),
        "delivered": len(times),
        "duplicate_photos": len(photos) - len(times),
        "duplicate_creates": len(ours) - len(set(ours)),
        "cpu_ms_per_job_bots": round(cpu / max(1, len(times)) * 1000, 1),
        "cpu_ms_per_job_server": round(server / max(1, len(times)) * 1000, 1),
        "log_problems": problems,
    }
    if len(times) >= 10:
        lo, hi = times[len(times) // 10], times[(len(times) * 9) // 10]
        middle = sum(1 for t in times if lo <= t <= hi)
        out["jobs_per_s"] = round((middle - 1) / max(1e-6, hi - lo), 1)
        out["jobs_per_s_whole_run"] = round(len(times) / (times[-1] - result["wall_start"]), 1)
    else:
        out["jobs_per_s"] = None
    return out


async def _at_rate(setups: Setups, store: str, procs: int) -> dict[str, Any]:
    ctx = setups.ctx
    count = int(REPLY_RATE * ctx.seconds(4))
    server = setups.server(store)
    async with setups.bots(store, procs, f"rate-{REPLY_RATE}") as bots:
        spec = _spec_for(ctx, bots, REPLY_RATE, count)
        before = await asyncio.to_thread(server_transactions, server)
        machine_before = machine_busy_seconds()
        mains_before = [main_thread_schedule(bot.pid) for bot in bots]
        result = await run_load(spec)
        mains = [
            (ran - ran0, waited - waited0)
            for (ran0, waited0), (ran, waited) in zip(
                mains_before, (main_thread_schedule(bot.pid) for bot in bots), strict=True
            )
        ]
        busy, total = (a - b for a, b in zip(machine_busy_seconds(), machine_before, strict=True))
        reply = await _reply_latency(ctx, result)
        await asyncio.sleep(STATS_FLUSH_S)
        # (the jobs started meanwhile are in it too: the same load for every revision)
        spent = await asyncio.to_thread(server_transactions, server) - before
    ack = _ack_figures(result)
    window = result["elapsed_s"] or 1.0
    # What the load left of the machine: its busy share (all processes: bots, database, fakes,
    # load generator) and, per bot, how long its main thread (the event loop) ran and how
    # long it was ready to run but waited for a CPU. Latency on two cores moves with these.
    cpu = {
        "machine_busy_share": round(busy / total, 2) if total else None,
        "main_thread_ran_s": [round(ran, 2) for ran, _ in mains],
        "main_thread_waited_s": [round(waited, 2) for _, waited in mains],
        "window_s": round(window, 2),
    }
    out: dict[str, Any] = {"ack": ack, "reply": reply, "cpu": cpu}
    if server is not None:
        out["db_transactions_per_update"] = round(spent / max(1, count), 2)
    return out


async def _guarded(run: Callable[[], Awaitable[dict[str, Any]]]) -> dict[str, Any]:
    """A measurement's figures, or {"error": ...} when its set-up failed (reported, not
    raised: the other set-ups still run)."""
    try:
        return await run()
    except (BenchError, OSError, RuntimeError, ValueError, KeyError) as exc:
        return {"error": f"{type(exc).__name__}: {exc}"[:300]}


async def report_cluster(ctx: Context) -> dict[str, Any]:
    """Report 8: saturation jobs/s, reply and ack latency at 200/s, for each set-up in turn."""
    with _cluster() as cluster:
        setups = Setups(ctx, cluster)
        figures: dict[str, dict[str, Any]] = {label(s, n): {} for s, n in SETUPS}
        for store, procs in SETUPS:
            figures[label(store, procs)]["saturation"] = await _guarded(
                functools.partial(_saturation, setups, store, procs)
            )
        for store, procs in SETUPS:
            figures[label(store, procs)][f"rate_{REPLY_RATE}"] = await _guarded(
                functools.partial(_at_rate, setups, store, procs)
            )
    one = figures["postgresql x1"]["saturation"].get("jobs_per_s")
    two = figures["postgresql x2"]["saturation"].get("jobs_per_s")
    scale = round(two / one, 2) if one and two else None
    reply_two = figures["postgresql x2"][f"rate_{REPLY_RATE}"].get("reply", {})
    p99 = reply_two.get("p99_ms")
    return {
        "setups": figures,
        "saturation_provider_latency_s": SATURATION_LATENCY_S,
        "scale_pg2_over_pg1": scale,
        "targets": {
            "scale": {
                "target": f">= {TARGET_SCALE}",
                "value": scale,
                "met": None if scale is None else scale >= TARGET_SCALE,
            },
            "reply_p99_ms_pg2": {
                "target": f"< {TARGET_REPLY_P99_MS:g}",
                "value": p99,
                "met": None
                if p99 is None
                else bool(p99 < TARGET_REPLY_P99_MS) and not reply_two.get("missing"),
            },
        },
    }
