"""JobStore: create (policy decided in the same transaction), claim, advance, finish, list."""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields
from datetime import datetime, timedelta
from typing import Any, Protocol, TypeVar

from imagebot.clock import iso, utcnow
from imagebot.models import FINAL_STATUSES, Job, JobKind, JobStatus, NewJob, Phase
from imagebot.store.db import INTERACTIVE, NORMAL, Conn, Database, Row
from imagebot.store.usage import SPEND_LOCK, Counters, read_counters, user_lock


class _Decision(Protocol):
    @property
    def allowed(self) -> bool: ...


D = TypeVar("D", bound=_Decision)

_JSON_LIST_FIELDS = (
    "output_urls",
    "result_paths",
    "result_file_ids",
    "delivered_message_ids",
    "input_file_ids",
)
_COLUMNS = tuple(f.name for f in fields(Job))
# held_until is no Job field (only claims read it); a handler lifts it with the status id
_WRITABLE = (frozenset(_COLUMNS) - {"id", "created_at", "update_id"}) | {"held_until"}


def _row_to_job(row: Row) -> Job:
    data: dict[str, Any] = {key: row[key] for key in row.keys() if key in _COLUMNS}  # noqa: SIM118 - Row has no __iter__ over keys
    for key in _JSON_LIST_FIELDS:
        data[key] = json.loads(data[key] or "[]")
    data["params"] = json.loads(data["params"] or "{}")
    data["kind"] = JobKind(data["kind"])
    data["status"] = JobStatus(data["status"])
    data["phase"] = Phase(data["phase"])
    return Job(**data)


def _encode(key: str, value: Any) -> Any:
    if key in _JSON_LIST_FIELDS or key == "params":
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, JobKind | JobStatus | Phase):
        return value.value
    return value


def _disown_running(conn: Conn, node: str, stamp: str) -> list[int]:
    """Node `node`'s running jobs lose their owner and their fence token moves on (whatever
    it might still write lands nowhere); their ids, for the log."""
    ids = [
        int(row["id"])
        for row in conn.execute(
            "SELECT id FROM jobs WHERE status = 'running' AND owner = ? ORDER BY id", (node,)
        )
    ]
    conn.execute(
        "UPDATE jobs SET owner = NULL, lease_token = lease_token + 1, updated_at = ?"
        " WHERE status = 'running' AND owner = ?",
        (stamp, node),
    )
    return ids


@dataclass(frozen=True, slots=True)
class JobFilter:
    """Filters of GET /jobs."""

    status: JobStatus | None = None
    kind: JobKind | None = None
    user_id: int | None = None
    chat_id: int | None = None
    since: str | None = None
    before_id: int | None = None
    limit: int = 50


# Phases in which a running job holds a provider slot (counted against runner.max_running);
# a job whose images are made (fetched, delivering) waits for Telegram without one.
SLOT_PHASES = "('new', 'submitting', 'submitted')"
_MAX_PLACED = 10_000
# Slot-holding running jobs (every process) and a job's 1-based place among the queued ones
# (its id the one parameter): what a handler asks of a job it just made.
_BUSY = f"(SELECT count(*) FROM jobs WHERE status = 'running' AND phase IN {SLOT_PHASES}) AS busy"  # noqa: S608
_BUSY_AND_POSITION = (
    f"{_BUSY}, (SELECT count(*) FROM jobs WHERE status = 'queued' AND id <= ?) AS position"  # noqa: S608
)
_INSERT_JOB_SQL = (
    "INSERT INTO jobs (kind, status, phase, update_id, chat_id, user_id, chat_type,"
    " command_message_id, prompt, input_file_id, input_file_size, input_width,"
    " input_height, parent_job_id, provider, params, cost_estimate_usd, created_at,"
    " updated_at, style_id, model, prompt_suffix, shape, images_asked, input_file_ids,"
    " source_index, held_until, language, owner) VALUES (?, 'queued', 'new',"
    " ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
)
# PostgreSQL, the job creation's statement after its reads: the job inserted, the update
# closed and the job read back with the running jobs and its place in line, in one round
# trip. The new row is not yet visible to the subqueries (one snapshot): the job counts
# itself in its place with the `+ 1`, and a queued job is not running.
_INSERT_CLOSE_AND_READ_BACK_SQL = (
    f"WITH new AS ({_INSERT_JOB_SQL} RETURNING *),"  # noqa: S608 - constants
    " closed AS (UPDATE inbox SET processed_at = ? WHERE update_id = ?"
    " AND processed_at IS NULL)"
    f" SELECT new.*, {_BUSY}, (SELECT count(*) FROM jobs WHERE status = 'queued'"
    " AND id < new.id) + 1 AS position FROM new"
)


class Claimed(list[Job]):
    """Jobs one claim handed to this node (oldest first); `adopted`: the ids among them that
    were running already (ownerless: their process died or stopped) rather than queued;
    `no_room`: the cap (or this node's share of it) left no slot to fill, so a claim takes no
    queued job until a slot is freed."""

    adopted: frozenset[int] = frozenset()
    no_room: bool = False


class JobStore:
    """All reads and writes of the jobs table.

    `node_id`: the process this store writes for (its cluster node id): jobs it creates and
    claims are owned by it, and its writes for a running job are fenced by owner and token.
    """

    def __init__(self, db: Database, node_id: str = "local") -> None:
        self.db = db
        self.node_id = node_id
        # PostgreSQL: what `busy_and_position` would answer for a job just made, read by its
        # creation's last statement (see `placed`)
        self._placed: dict[int, tuple[int, int]] = {}

    async def create(
        self,
        new: NewJob,
        decide: Callable[[Counters], D],
        *,
        with_spend: bool = True,
        after_insert: Callable[[Conn, int, D], None] | None = None,
        hold_s: float | None = None,
    ) -> tuple[D | None, Job | None]:
        """Create a job for an update if `decide(counters)` allows it, in one transaction.

        The same transaction marks the update processed, so a crash leaves either both or
        neither. Returns (None, None) when the update already made a job (a resent update).
        `decide` runs on the writer thread, between reading the counters and inserting;
        `after_insert(conn, job_id, decision)` right after the insert, in the same transaction
        (credits reserve there; an exception it raises rolls the job back and propagates).
        `hold_s`: the job is created held (see `release`): `claim_next` leaves it alone until
        it is released or `hold_s` has passed.
        """
        now = utcnow()
        stamp = iso(now)
        held_until = iso(now + timedelta(seconds=hold_s)) if hold_s is not None else None

        def create(conn: Conn) -> tuple[D | None, Row | None]:
            # The counters read below stay true until the insert commits, even with several
            # processes on one database: the user's own lock, and the global one only when
            # the whole day's spend is read (one global lock serialized every creation of
            # every process, and each process's job writes queued behind that wait).
            if with_spend:
                self.db.lock(conn, SPEND_LOCK)
            self.db.lock(conn, user_lock(new.user_id))
            counters = read_counters(
                conn,
                user_id=new.user_id,
                kind=new.kind,
                now=now,
                with_spend=with_spend,
                update_id=new.update_id,
                dialect=self.db.dialect,
            )
            if counters is None:
                return None, None
            decision = decide(counters)
            if not decision.allowed:
                return decision, None
            values = (
                new.kind.value,
                new.update_id,
                new.chat_id,
                new.user_id,
                new.chat_type,
                new.command_message_id,
                new.prompt,
                new.input_file_id,
                new.input_file_size,
                new.input_width,
                new.input_height,
                new.parent_job_id,
                new.provider,
                json.dumps(new.params, ensure_ascii=False),
                new.cost_estimate_usd,
                stamp,
                stamp,
                new.style_id,
                new.model,
                new.prompt_suffix,
                new.shape,
                new.images_asked,
                json.dumps(list(new.input_file_ids)),
                new.source_index,
                held_until,
                new.language,
                # the creating process: its hold is released if it dies (ClusterStore.reap)
                self.node_id,
            )
            # On PostgreSQL the insert, the inbox row's close and the read-back (with the
            # handler's next question, its place in line) are one statement: each statement
            # of this transaction is a round trip while the user waits. SQLite has no
            # data-modifying CTE (nor RETURNING before 3.35, e.g. Debian 11).
            if self.db.dialect == "postgresql":
                row = conn.execute(
                    _INSERT_CLOSE_AND_READ_BACK_SQL, (*values, stamp, new.update_id)
                ).fetchone()
                if after_insert is not None:
                    after_insert(conn, int(row["id"]), decision)
                return decision, row
            job_id = int(conn.execute(_INSERT_JOB_SQL, values).lastrowid or 0)
            if after_insert is not None:
                after_insert(conn, job_id, decision)
            conn.execute(
                "UPDATE inbox SET processed_at = ? WHERE update_id = ? AND processed_at IS NULL",
                (stamp, new.update_id),
            )
            return decision, conn.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()

        decision, row = await self.db.write(create, priority=INTERACTIVE)
        if row is None:
            return decision, None
        job = _row_to_job(row)
        if "busy" in row.keys():  # noqa: SIM118 - Row has no __iter__ over keys
            if len(self._placed) >= _MAX_PLACED:  # handlers that never asked (bounded)
                self._placed.clear()
            self._placed[job.id] = (int(row["busy"]), int(row["position"]))
        return decision, job

    def placed(self, job_id: int) -> tuple[int, int] | None:
        """Once, for a job this process just created on PostgreSQL: what `busy_and_position`
        answered in the creation's own transaction (None: ask the database). The place is
        the one the user is told first; a read after the commit would cost the handler a turn
        of a busy event loop (80-150 ms each at 200 updates/s with two processes)."""
        return self._placed.pop(job_id, None)

    async def release(self, job_id: int) -> None:
        """The handler that created a held job is done with it (its status message id is
        saved, or could not be): the runner may claim it now."""
        await self.db.execute_write(
            "UPDATE jobs SET held_until = NULL WHERE id = ? AND held_until IS NOT NULL",
            (job_id,),
            priority=INTERACTIVE,
        )

    async def disown_running(self) -> list[int]:
        """This node's running jobs lose their owner (token +1): it was declared dead and
        dropped their runs; those nobody took over yet are adopted afresh (by any node, this
        one included). Jobs another node took over already are not touched."""
        node, stamp = self.node_id, iso()
        return await self.db.write(lambda conn: _disown_running(conn, node, stamp))

    async def hand_back(self) -> list[int]:
        """A clean stop of this node: its running jobs lose their owner (token +1, so nothing
        it might still write lands) and another live process, or this one after its restart,
        adopts them at once; the jobs its handlers still held are released. Returns the ids
        of the running jobs handed back."""
        node = self.node_id
        stamp = iso()

        def hand_back(conn: Conn) -> list[int]:
            ids = _disown_running(conn, node, stamp)
            conn.execute(
                "UPDATE jobs SET held_until = NULL, owner = NULL"
                " WHERE status = 'queued' AND owner = ? AND held_until IS NOT NULL",
                (node,),
            )
            return ids

        return await self.db.write(hand_back)

    async def get(self, job_id: int) -> Job | None:
        row = await self.db.fetchone("SELECT * FROM jobs WHERE id = ?", (job_id,))
        return _row_to_job(row) if row else None

    async def by_ids(self, job_ids: Sequence[int]) -> list[Job]:
        if not job_ids:
            return []
        marks = ", ".join("?" for _ in job_ids)
        rows = await self.db.fetchall(
            f"SELECT * FROM jobs WHERE id IN ({marks}) ORDER BY id",  # noqa: S608 - placeholders only
            list(job_ids),
        )
        return [_row_to_job(row) for row in rows]

    async def find(self, flt: JobFilter) -> list[Job]:
        clauses: list[str] = []
        params: list[Any] = []
        for column, value in (
            ("status", flt.status.value if flt.status else None),
            ("kind", flt.kind.value if flt.kind else None),
            ("user_id", flt.user_id),
            ("chat_id", flt.chat_id),
        ):
            if value is not None:
                clauses.append(f"{column} = ?")
                params.append(value)
        if flt.since:
            clauses.append("created_at >= ?")
            params.append(flt.since)
        if flt.before_id is not None:
            clauses.append("id < ?")
            params.append(flt.before_id)
        where = f"WHERE {' AND '.join(clauses)}" if clauses else ""
        rows = await self.db.fetchall(
            f"SELECT * FROM jobs {where} ORDER BY id DESC LIMIT ?",  # noqa: S608 - fixed column names
            (*params, flt.limit),
        )
        return [_row_to_job(row) for row in rows]

    async def update(
        self,
        job_id: int,
        *,
        expect: Sequence[JobStatus] | None = None,
        fence: Job | None = None,
        bump: bool = False,
        not_phases: Sequence[Phase] = (),
        priority: int = NORMAL,
        **values: Any,
    ) -> bool:
        """Set columns of one job; with `expect`, only if its status is one of those; with
        `fence`, only while the row's owner and lease token are still those of `fence` (the
        job object its runner holds): False once another process took the job over. `bump`
        moves the lease token on, so the writes of whoever held it before match nothing.
        `not_phases`: only while the row's phase is none of those."""
        unknown = set(values) - _WRITABLE
        if unknown:
            raise ValueError(f"not writable: {sorted(unknown)}")
        values["updated_at"] = iso()
        assignments = ", ".join(f"{key} = ?" for key in values)
        if bump:
            assignments += ", lease_token = lease_token + 1"
        params = [_encode(key, value) for key, value in values.items()]
        sql = f"UPDATE jobs SET {assignments} WHERE id = ?"  # noqa: S608 - keys checked above
        params.append(job_id)
        if expect:
            sql += f" AND status IN ({', '.join('?' for _ in expect)})"
            params.extend(status.value for status in expect)
        if fence is not None:
            sql += " AND owner = ? AND lease_token = ?"
            params.extend((fence.owner, fence.lease_token))
        if not_phases:
            sql += f" AND phase NOT IN ({', '.join('?' for _ in not_phases)})"
            params.extend(phase.value for phase in not_phases)
        return await self.db.execute_write(sql, params, priority=priority) == 1

    async def owns(self, job: Job) -> bool:
        """The job is still running under `job`'s owner and lease token (nobody took it)."""
        row = await self.db.fetchone(
            "SELECT 1 AS one FROM jobs WHERE id = ? AND status = 'running' AND owner = ?"
            " AND lease_token = ?",
            (job.id, job.owner, job.lease_token),
        )
        return row is not None

    async def not_owned(self, jobs: Sequence[Job]) -> list[int]:
        """The ids among `jobs` (as their runner holds them) that are no longer running under
        the same owner and lease token: ended, canceled or swept elsewhere, or taken over."""
        if not jobs:
            return []
        marks = ", ".join("?" for _ in jobs)
        rows = await self.db.fetchall(
            "SELECT id, status, owner, lease_token FROM jobs"  # noqa: S608 - placeholders only
            f" WHERE id IN ({marks})",
            [job.id for job in jobs],
        )
        current = {int(row["id"]): row for row in rows}
        lost = []
        for job in jobs:
            row = current.get(job.id)
            if (
                row is None
                or row["status"] != "running"
                or row["owner"] != job.owner
                or int(row["lease_token"]) != job.lease_token
            ):
                lost.append(job.id)
        return lost

    async def slots_busy(self) -> int:
        """Running jobs holding a provider slot, across every process on the database."""
        row = await self.db.fetchone(
            "SELECT count(*) AS n FROM jobs"  # noqa: S608 - a constant
            f" WHERE status = 'running' AND phase IN {SLOT_PHASES}"
        )
        return int(row["n"]) if row else 0

    async def claim_next(
        self, cap: int, timeouts: dict[JobKind, float], *, lease_s: float = 30.0
    ) -> Claimed:
        """Give this node jobs to run, under `cap` slot-holding running jobs across every
        process on the database (runner.max_running), in one transaction that claimers take
        one at a time (the `jobs:claim` lock: the count it reads stays true until it commits).

        First the ownerless running jobs (their process died or stopped: they count toward
        the cap already), then the oldest queued jobs (FIFO by id), skipping jobs still held
        by the handler that created them (see `create(hold_s=)`), up to the free slots and
        this node's fair share: ceil(cap / live worker nodes) minus what it runs already.
        Each gets `owner = this node, lease_token + 1`. Adopted jobs not yet at the vendor
        (phase new or submitting) get a fresh deadline; submitted ones keep theirs.
        """
        node = self.node_id
        claimed = Claimed()
        if cap <= 0:
            return claimed
        now = utcnow()
        stamp = iso(now)
        deadlines = {kind: iso(now + timedelta(seconds=s)) for kind, s in timeouts.items()}
        workers_sql = (
            "SELECT count(*) AS n FROM nodes WHERE roles LIKE '%worker%'"  # noqa: S608 - our own expression
            f" AND heartbeat_at > {self.db.clock_sql(-lease_s)}"
        )

        no_room: list[bool] = []  # set by the claim (on the writer thread)

        def claim(conn: Conn) -> tuple[list[Row], list[int]]:
            no_room.clear()  # (a retried transaction starts over)
            self.db.lock(conn, "jobs:claim")
            row = conn.execute(
                "SELECT count(*) AS busy, sum(CASE WHEN owner = ? THEN 1 ELSE 0 END) AS mine"  # noqa: S608 - a constant
                f" FROM jobs WHERE status = 'running' AND phase IN {SLOT_PHASES}",
                (node,),
            ).fetchone()
            busy, mine = int(row["busy"]), int(row["mine"] or 0)
            workers = max(1, int(conn.execute(workers_sql).fetchone()["n"]))
            share = -(-cap // workers) - mine
            if share <= 0:
                no_room.append(True)
                return [], []
            adopted = [
                int(r[0])
                for r in conn.execute(
                    "SELECT id FROM jobs WHERE status = 'running' AND owner IS NULL"  # noqa: S608 - a constant
                    f" AND phase IN {SLOT_PHASES} ORDER BY id LIMIT ?" + self.db.for_update,
                    (share,),
                )
            ]
            take = min(share - len(adopted), cap - busy)
            if take <= 0:
                no_room.append(True)
            queued = (
                [
                    int(r[0])
                    for r in conn.execute(
                        "SELECT id FROM jobs WHERE status = 'queued'"  # noqa: S608 - the dialect's fixed clause
                        " AND (held_until IS NULL OR held_until <= ?) ORDER BY id LIMIT ?"
                        + self.db.for_update,
                        (stamp, take),
                    )
                ]
                if take > 0
                else []
            )
            for kind, deadline in deadlines.items():
                if adopted:
                    marks = ", ".join("?" for _ in adopted)
                    conn.execute(
                        "UPDATE jobs SET owner = ?, lease_token = lease_token + 1,"  # noqa: S608 - placeholders only
                        " updated_at = ?, deadline_at = CASE WHEN phase = 'submitted'"
                        " THEN deadline_at ELSE ? END"
                        f" WHERE kind = ? AND owner IS NULL AND id IN ({marks})",
                        (node, stamp, deadline, kind.value, *adopted),
                    )
                if queued:
                    marks = ", ".join("?" for _ in queued)
                    conn.execute(
                        "UPDATE jobs SET status = 'running', owner = ?,"  # noqa: S608 - placeholders only
                        " lease_token = lease_token + 1, started_at = ?, updated_at = ?,"
                        f" deadline_at = ? WHERE kind = ? AND id IN ({marks})",
                        (node, stamp, stamp, deadline, kind.value, *queued),
                    )
            ids = adopted + queued
            if not ids:
                return [], []
            marks = ", ".join("?" for _ in ids)
            rows = conn.execute(
                f"SELECT * FROM jobs WHERE id IN ({marks}) ORDER BY id",  # noqa: S608
                ids,
            ).fetchall()
            return rows, adopted

        rows, adopted = await self.db.write(claim)
        claimed.extend(_row_to_job(row) for row in rows)
        claimed.adopted = frozenset(adopted)
        claimed.no_room = bool(no_room)
        return claimed

    async def finish(
        self,
        job_id: int,
        status: JobStatus,
        *,
        error_code: str | None = None,
        error_message: str | None = None,
        phase: Phase = Phase.DONE,
        fence: Job | None = None,
        not_phases: Sequence[Phase] = (),
        **values: Any,
    ) -> bool:
        """Write a final status once; False if the job was already final (or, with `fence`,
        no longer the fencing runner's; or, with `not_phases`, in one of those phases).

        `phase=SETTLING` records that the chat still has to be tidied (see `unsettled`). The
        lease token moves on, so a process still running the job (a cancel or the sweep
        ended it from another one) finds every further write refused and stops.
        """
        assert status in FINAL_STATUSES
        return await self.update(
            job_id,
            expect=(JobStatus.QUEUED, JobStatus.RUNNING),
            fence=fence,
            bump=True,
            not_phases=not_phases,
            status=status,
            phase=phase,
            error_code=error_code,
            error_message=error_message,
            finished_at=iso(),
            **values,
        )

    async def unsettled(self, due_by: datetime | None = None) -> list[Job]:
        """Final jobs whose chat was not tidied yet (status line to remove, failure or cancel
        message to send): the process died between the final write and that message, or
        Telegram could not take it. With `due_by`, only those whose next try is due then."""
        sql = (
            "SELECT * FROM jobs WHERE status IN ('succeeded', 'failed', 'canceled')"
            " AND phase = 'settling'"
        )
        params: tuple[str, ...] = ()
        if due_by is not None:
            sql += " AND (deliver_after IS NULL OR deliver_after <= ?)"
            params = (iso(due_by),)
        rows = await self.db.fetchall(sql + " ORDER BY id", params)
        return [_row_to_job(row) for row in rows]

    async def deliveries_due(self, now: datetime) -> Claimed:
        """Running jobs whose images are made (phase fetched or delivering) and whose next
        delivery try is due, among this node's own and the ownerless ones (their process
        died or stopped: adopted here, owner = this node, lease token + 1): parked ones, and
        any a restart or a storage fault left. Other live processes' jobs are theirs."""
        node = self.node_id
        stamp = iso(now)

        def due(conn: Conn) -> tuple[list[Row], list[int]]:
            found = conn.execute(
                "SELECT id, owner FROM jobs WHERE status = 'running'"  # noqa: S608 - the dialect's fixed clause
                " AND phase IN ('fetched', 'delivering')"
                " AND (deliver_after IS NULL OR deliver_after <= ?)"
                " AND (owner IS NULL OR owner = ?) ORDER BY id" + self.db.for_update,
                (stamp, node),
            ).fetchall()
            if not found:
                return [], []
            orphans = [int(row["id"]) for row in found if row["owner"] is None]
            if orphans:
                marks = ", ".join("?" for _ in orphans)
                conn.execute(
                    "UPDATE jobs SET owner = ?, lease_token = lease_token + 1, updated_at = ?"  # noqa: S608 - placeholders only
                    f" WHERE owner IS NULL AND id IN ({marks})",
                    (node, iso(), *orphans),
                )
            ids = [int(row["id"]) for row in found]
            marks = ", ".join("?" for _ in ids)
            rows = conn.execute(
                f"SELECT * FROM jobs WHERE id IN ({marks}) ORDER BY id",  # noqa: S608
                ids,
            ).fetchall()
            return rows, orphans

        rows, adopted = await self.db.write(due)
        claimed = Claimed(_row_to_job(row) for row in rows)
        claimed.adopted = frozenset(adopted)
        return claimed

    async def waiting_counts(self) -> dict[str, int]:
        """Results (`deliveries`) and chat notices (`notices`) waiting for Telegram."""
        row = await self.db.fetchone(
            "SELECT sum(CASE WHEN status = 'running' THEN 1 ELSE 0 END) AS deliveries,"
            " sum(CASE WHEN status != 'running' THEN 1 ELSE 0 END) AS notices FROM jobs"
            " WHERE deliver_after IS NOT NULL AND phase IN ('fetched', 'delivering', 'settling')"
            " AND status IN ('running', 'succeeded', 'failed', 'canceled')"
        )
        if row is None:
            return {"deliveries": 0, "notices": 0}
        return {"deliveries": int(row["deliveries"] or 0), "notices": int(row["notices"] or 0)}

    async def by_status(self, *statuses: JobStatus) -> list[Job]:
        marks = ", ".join("?" for _ in statuses)
        rows = await self.db.fetchall(
            f"SELECT * FROM jobs WHERE status IN ({marks}) ORDER BY id",  # noqa: S608 - placeholders only
            [s.value for s in statuses],
        )
        return [_row_to_job(row) for row in rows]

    async def counts(self) -> dict[str, int]:
        rows = await self.db.fetchall(
            "SELECT status, count(*) AS n FROM jobs WHERE status IN ('queued', 'running')"
            " GROUP BY status"
        )
        counts = {"queued": 0, "running": 0}
        counts.update({row["status"]: int(row["n"]) for row in rows})
        return counts

    async def queue_positions(self) -> dict[int, int]:
        """1-based place in line of every queued job."""
        rows = await self.db.fetchall("SELECT id FROM jobs WHERE status = 'queued' ORDER BY id")
        return {row["id"]: n for n, row in enumerate(rows, start=1)}

    async def busy_and_position(self, job_id: int) -> tuple[int, int]:
        """`_BUSY_AND_POSITION` for `job_id`, in one query."""
        row = await self.db.fetchone(f"SELECT {_BUSY_AND_POSITION}", (job_id,))
        return (int(row["busy"]), int(row["position"])) if row else (0, 0)

    async def queue_position(self, job_id: int) -> int:
        row = await self.db.fetchone(
            "SELECT count(*) AS n FROM jobs WHERE status = 'queued' AND id <= ?", (job_id,)
        )
        return int(row["n"]) if row else 0

    async def latest_active(self, user_id: int, chat_id: int) -> Job | None:
        """The user's newest queued or running job in this chat (for /cancel)."""
        row = await self.db.fetchone(
            "SELECT * FROM jobs WHERE user_id = ? AND chat_id = ?"
            " AND status IN ('queued', 'running') ORDER BY id DESC LIMIT 1",
            (user_id, chat_id),
        )
        return _row_to_job(row) if row else None

    async def history(self, user_id: int, chat_id: int, limit: int = 10) -> list[Job]:
        """The user's newest finished jobs in this chat (for /history), newest first."""
        rows = await self.db.fetchall(
            "SELECT * FROM jobs WHERE user_id = ? AND chat_id = ?"
            " AND status IN ('succeeded', 'failed', 'canceled') ORDER BY id DESC LIMIT ?",
            (user_id, chat_id, limit),
        )
        return [_row_to_job(row) for row in rows]

    async def overdue(self, now: datetime, slack_s: float) -> list[Job]:
        """Running jobs whose deadline passed more than `slack_s` ago. Jobs whose images are
        made (phase fetched or delivering) have no deadline: only the delivery window ends
        them (see Pipeline.park)."""
        rows = await self.db.fetchall(
            "SELECT * FROM jobs WHERE status = 'running' AND deadline_at < ?"
            " AND phase NOT IN ('fetched', 'delivering') ORDER BY id",
            (iso(now - timedelta(seconds=slack_s)),),
        )
        return [_row_to_job(row) for row in rows]

    async def prune(self, older_than_days: float) -> list[Job]:
        """Delete final jobs older than the retention; return them (their files go too)."""
        cutoff = iso(utcnow() - timedelta(days=older_than_days))

        def prune(conn: Conn) -> list[Row]:
            rows = conn.execute(
                "SELECT * FROM jobs WHERE status IN ('succeeded', 'failed', 'canceled')"
                " AND coalesce(finished_at, created_at) < ?",
                (cutoff,),
            ).fetchall()
            conn.executemany("DELETE FROM jobs WHERE id = ?", [(row["id"],) for row in rows])
            conn.executemany(
                "DELETE FROM remix_prompts WHERE job_id = ?", [(row["id"],) for row in rows]
            )
            return rows

        return [_row_to_job(row) for row in await self.db.write(prune)]

    async def with_results_older_than(self, days: float) -> list[Job]:
        cutoff = iso(utcnow() - timedelta(days=days))
        rows = await self.db.fetchall(
            "SELECT * FROM jobs WHERE result_paths != '[]' AND finished_at < ?", (cutoff,)
        )
        return [_row_to_job(row) for row in rows]
