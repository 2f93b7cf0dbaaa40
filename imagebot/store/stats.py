"""Today's numbers for the admins' /stats, read from the jobs table (UTC day)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import datetime

from imagebot.clock import iso, parse_iso
from imagebot.store.db import Database
from imagebot.store.usage import day_start

TOP_ERRORS = 5


@dataclass(frozen=True, slots=True)
class DayStats:
    since: datetime
    # (kind, status) -> jobs created today
    jobs: dict[tuple[str, str], int] = field(default_factory=dict)
    images_delivered: int = 0
    spend_usd: float = 0.0  # estimate of today's jobs that were not failed or canceled
    p50_s: float | None = None  # request to delivered result, succeeded jobs of today
    p95_s: float | None = None
    errors: list[tuple[str, int]] = field(default_factory=list)  # most frequent first
    queued_now: int = 0
    running_now: int = 0

    @property
    def total(self) -> int:
        return sum(self.jobs.values())


def percentile(values: list[float], fraction: float) -> float | None:
    """The nearest-rank percentile (an observed value, never an interpolation)."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, -(-len(ordered) * fraction // 1))  # ceil(n * fraction), at least 1
    return ordered[int(rank) - 1]


class Stats:
    """The numbers of the admins' /stats."""

    def __init__(self, db: Database) -> None:
        self.db = db

    async def today(self, now: datetime) -> DayStats:
        return await _day_stats(self.db, now)


async def _day_stats(db: Database, now: datetime) -> DayStats:
    """Four small queries over today's jobs (the jobs_created index) and the live counts."""
    since = day_start(now)
    start = iso(since)
    jobs = {
        (str(r["kind"]), str(r["status"])): int(r["n"])
        for r in await db.fetchall(
            "SELECT kind, status, count(*) AS n FROM jobs WHERE created_at >= ?"
            " GROUP BY kind, status",
            (start,),
        )
    }
    images = 0
    durations: list[float] = []
    for row in await db.fetchall(
        "SELECT created_at, finished_at, result_file_ids FROM jobs"
        " WHERE created_at >= ? AND status = 'succeeded'",
        (start,),
    ):
        ids = json.loads(row["result_file_ids"] or "[]")
        images += len(ids) if isinstance(ids, list) else 0
        if row["finished_at"]:
            elapsed = parse_iso(row["finished_at"]) - parse_iso(row["created_at"])
            durations.append(max(0.0, elapsed.total_seconds()))
    spend = await db.fetchone(
        "SELECT coalesce(sum(cost_estimate_usd), 0) AS usd FROM jobs"
        " WHERE created_at >= ? AND status NOT IN ('failed', 'canceled')",
        (start,),
    )
    errors = [
        (str(r["code"]), int(r["n"]))
        for r in await db.fetchall(
            "SELECT coalesce(error_code, 'unknown') AS code, count(*) AS n FROM jobs"
            " WHERE created_at >= ? AND status = 'failed' GROUP BY code"
            " ORDER BY n DESC, code LIMIT ?",
            (start, TOP_ERRORS),
        )
    ]
    live = {
        str(r["status"]): int(r["n"])
        for r in await db.fetchall(
            "SELECT status, count(*) AS n FROM jobs WHERE status IN ('queued', 'running')"
            " GROUP BY status"
        )
    }
    return DayStats(
        since=since,
        jobs=jobs,
        images_delivered=images,
        spend_usd=float(spend["usd"]) if spend else 0.0,
        p50_s=percentile(durations, 0.50),
        p95_s=percentile(durations, 0.95),
        errors=errors,
        queued_now=live.get("queued", 0),
        running_now=live.get("running", 0),
    )
