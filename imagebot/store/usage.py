"""Counters behind the rate limit, daily caps and spend cap, read from the jobs table.

Daily caps count images: a job holds the images it asks for from creation until it fails or
is canceled (then they return), and once delivered only the images the user got (a provider's
safety filter may withhold some). So the counts are the images of the user's jobs of today
that are not failed or canceled. With one image per request that is simply the jobs.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

from imagebot.clock import iso, parse_iso
from imagebot.models import JobKind
from imagebot.store.db import Conn, Database

RATE_WINDOW = timedelta(minutes=1)
# A failed or canceled job gives its unit back, so only other jobs count.
_IMAGES = "coalesce(images_delivered, images_asked)"
_COUNT_CHARGED = (
    f"SELECT coalesce(sum({_IMAGES}), 0) FROM jobs"  # noqa: S608 - a fixed expression
    " WHERE created_at >= ? AND status NOT IN ('failed', 'canceled')"
)
_SPENT = (
    "SELECT coalesce(sum(cost_estimate_usd), 0) FROM jobs"
    " WHERE created_at >= ? AND status NOT IN ('failed', 'canceled')"
)
_PER_KIND = (
    f"SELECT kind, sum({_IMAGES}) AS n FROM jobs"  # noqa: S608 - a fixed expression
    " WHERE created_at >= ? AND status NOT IN ('failed', 'canceled') AND user_id = ?"
    " GROUP BY kind"
)


# Advisory locks of job creation (Database.lock: PostgreSQL; one writer on SQLite). A user's
# counters and credit balance change only under that user's lock, so processes creating jobs
# for different users never wait for each other; the day's spend of every user (read only
# when a spend cap is set) is guarded by the global lock, taken first.
SPEND_LOCK = "jobs:create"


def user_lock(user_id: int) -> str:
    """The lock a user's job creations and balance decreases take."""
    return f"jobs:create:user:{user_id}"


@dataclass(frozen=True, slots=True)
class Counters:
    """What the policy needs to know about one user's request, read in the write transaction."""

    recent_requests: tuple[datetime, ...]  # the user's job creations inside the rate window
    used_today: int  # the user's charged images of this kind since 00:00 UTC
    spent_today_usd: float  # estimated spend of every user since 00:00 UTC


def day_start(now: datetime) -> datetime:
    return now.replace(hour=0, minute=0, second=0, microsecond=0)


def read_counters(
    conn: Conn,
    *,
    user_id: int,
    kind: JobKind,
    now: datetime,
    with_spend: bool,
    update_id: int,
    dialect: str,
) -> Counters | None:
    """Read inside the job-creating transaction, after its locks: None when update
    `update_id` made a job already (a resent update), else the user's counters.

    `with_spend=False` skips summing the whole day's spend when no spend cap is set. On
    PostgreSQL the reads are one statement (each statement is a round trip while the user
    waits); its snapshot is taken when it starts, after the lock statement returned, as the
    separate reads' were. SQLite runs them one by one (no round trips there).
    """
    since_day = iso(day_start(now))
    window = iso(now - RATE_WINDOW)
    used_sql = _COUNT_CHARGED + " AND user_id = ? AND kind = ?"
    if dialect == "postgresql":
        spent_sql = f", ({_SPENT}) AS spent" if with_spend else ""
        row = conn.execute(
            f"SELECT EXISTS (SELECT 1 FROM jobs WHERE update_id = ?) AS made,"  # noqa: S608
            " ARRAY(SELECT created_at FROM jobs WHERE user_id = ? AND created_at >= ?"
            f" ORDER BY created_at) AS recent, ({used_sql}) AS used{spent_sql}",
            (update_id, user_id, window, since_day, user_id, kind.value)
            + ((since_day,) if with_spend else ()),
        ).fetchone()
        if row["made"]:
            return None
        return Counters(
            tuple(parse_iso(stamp) for stamp in row["recent"]),
            int(row["used"]),
            float(row["spent"]) if with_spend else 0.0,
        )
    if conn.execute("SELECT 1 FROM jobs WHERE update_id = ?", (update_id,)).fetchone():
        return None
    recent = tuple(
        parse_iso(row[0])
        for row in conn.execute(
            "SELECT created_at FROM jobs WHERE user_id = ? AND created_at >= ?"
            " ORDER BY created_at",
            (user_id, window),
        )
    )
    row = conn.execute(used_sql, (since_day, user_id, kind.value)).fetchone()
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
        """The user's charged images per kind since 00:00 UTC (for /usage)."""
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

    async def used_today_by_user(self, since: datetime) -> dict[int, int]:
        """Charged jobs (not failed or canceled) per user since `since`, for /users."""
        rows = await self.db.fetchall(
            "SELECT user_id, count(*) AS n FROM jobs WHERE created_at >= ?"
            " AND status NOT IN ('failed', 'canceled') GROUP BY user_id",
            (iso(since),),
        )
        return {int(r["user_id"]): int(r["n"]) for r in rows}
