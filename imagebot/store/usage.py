"""Counters behind the rate limit, daily caps and spend cap, read from the jobs table.

A job holds one unit of its user's daily cap from creation until it fails or is canceled, so
the counts are simply the user's jobs of today that are not failed or canceled.
"""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass
from datetime import datetime, timedelta

from imagebot.clock import iso, parse_iso
from imagebot.models import JobKind
from imagebot.store.db import Database

RATE_WINDOW = timedelta(minutes=1)
# A failed or canceled job gives its unit back, so only other jobs count.
_COUNT_CHARGED = (
    "SELECT count(*) FROM jobs WHERE created_at >= ? AND status NOT IN ('failed', 'canceled')"
)
_SPENT = (
    "SELECT coalesce(sum(cost_estimate_usd), 0) FROM jobs"
    " WHERE created_at >= ? AND status NOT IN ('failed', 'canceled')"
)
_PER_KIND = (
    "SELECT kind, count(*) AS n FROM jobs"
    " WHERE created_at >= ? AND status NOT IN ('failed', 'canceled') AND user_id = ?"
    " GROUP BY kind"
)


@dataclass(frozen=True, slots=True)
class Counters:
    """What the policy needs to know about one user's request, read in the write transaction."""

    recent_requests: tuple[datetime, ...]  # the user's job creations inside the rate window
    used_today: int  # the user's charged jobs of this kind since 00:00 UTC
    spent_today_usd: float  # estimated spend of every user since 00:00 UTC


def day_start(now: datetime) -> datetime:
    return now.replace(hour=0, minute=0, second=0, microsecond=0)


def read_counters(
    conn: sqlite3.Connection, *, user_id: int, kind: JobKind, now: datetime, with_spend: bool
) -> Counters:
    """Read inside the job-creating transaction (on the writer thread).

    `with_spend=False` skips summing the whole day's spend when no spend cap is set.
    """
    since_day = iso(day_start(now))
    recent = tuple(
        parse_iso(row[0])
        for row in conn.execute(
            "SELECT created_at FROM jobs WHERE user_id = ? AND created_at >= ?"
            " ORDER BY created_at",
            (user_id, iso(now - RATE_WINDOW)),
        )
    )
    row = conn.execute(
        _COUNT_CHARGED + " AND user_id = ? AND kind = ?", (since_day, user_id, kind.value)
    ).fetchone()
    used = int(row[0]) if row else 0
    spent = 0.0
    if with_spend:
        row = conn.execute(_SPENT, (since_day,)).fetchone()
        spent = float(row[0]) if row else 0.0
    return Counters(recent, used, spent)


class Usage:
    """The per-user counters handlers read: today's jobs per kind, and notice throttling."""

    def __init__(self, db: Database) -> None:
        self.db = db

    async def used_today(self, user_id: int, now: datetime) -> dict[JobKind, int]:
        """The user's charged jobs per kind since 00:00 UTC (for /usage)."""
        rows = await self.db.fetchall(_PER_KIND, (iso(day_start(now)), user_id))
        counts = dict.fromkeys(JobKind, 0)
        for row in rows:
            counts[JobKind(row["kind"])] = int(row["n"])
        return counts

    async def claim_notice(self, user_id: int, reason: str, interval_s: float) -> bool:
        """True if the user may be told about `reason` now (once per interval); records it."""
        now = iso()
        cutoff = iso(parse_iso(now) - timedelta(seconds=interval_s))
        changed = await self.db.execute_write(
            "INSERT INTO notices (user_id, reason, sent_at) VALUES (?, ?, ?)"
            " ON CONFLICT (user_id, reason) DO UPDATE SET sent_at = excluded.sent_at"
            " WHERE notices.sent_at <= ?",
            (user_id, reason, now, cutoff),
        )
        return changed == 1
