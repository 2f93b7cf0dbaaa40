"""The store contract, run against both backends (SQLite file and PostgreSQL database):
dedupe, claim, finish, the quota it implies, retention, migrations, concurrency."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncIterator
from datetime import timedelta
from pathlib import Path

import pytest

from imagebot.clock import iso, parse_iso, utcnow
from imagebot.errors import StoreError
from imagebot.models import Job, JobKind, JobStatus, NewJob, Phase
from imagebot.policy import ALLOW, Decision, Reason
from imagebot.store.cluster import ClusterStore
from imagebot.store.db import NORMAL, URGENT, Conn, Database
from imagebot.store.groupcall import GroupCall, Member
from imagebot.store.inbox import Inbox
from imagebot.store.jobs import JobFilter, JobStore
from imagebot.store.ledger import Ledger, NotEnoughCredits, reserve_in
from imagebot.store.migrate import load_migrations, migrate
from imagebot.store.usage import Counters, Usage
from tests.fakes.base import wait_until
from tests.storeview import query

TIMEOUTS = {JobKind.GENERATE: 90.0, JobKind.EDIT: 30.0}


@pytest.fixture(params=["sqlite", "postgresql"])
def target(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """Where the store lives: a SQLite file, or a fresh PostgreSQL database."""
    if request.param == "postgresql":
        return str(request.getfixturevalue("pg_url"))
    return str(tmp_path / "store.db")


@pytest.fixture
async def db(target: str) -> AsyncIterator[Database]:
    database = Database(target)
    await database.open()
    await migrate(database)
    yield database
    await database.close()


def new_job(update_id: int, user_id: int = 1, kind: JobKind = JobKind.GENERATE) -> NewJob:
    return NewJob(
        kind, update_id, user_id, user_id, "private", f"prompt {update_id}", "local", {}, 0.01
    )


async def test_one_job_per_update(db: Database) -> None:
    """Creating twice from the same update_id makes one job; the second call says so."""
    store = JobStore(db)
    first = await store.create(new_job(10), lambda c: ALLOW)
    second = await store.create(new_job(10), lambda c: ALLOW)
    assert first[1] is not None and first[1].status is JobStatus.QUEUED
    assert second == (None, None)


async def test_creation_on_postgresql_answers_the_place_in_line(db: Database) -> None:
    """On PostgreSQL the creating transaction reads what the handler asks next (slot-holding
    running jobs, the new job's place among the queued), the same as a read after the commit,
    handed out once; on SQLite (one process, the runner counts its own) nothing is kept."""
    store = JobStore(db)
    made = [(await store.create(new_job(n), lambda c: ALLOW))[1] for n in (21, 22, 23)]
    assert all(job is not None for job in made)
    await db.execute_write(
        "UPDATE jobs SET status = 'running', phase = 'submitted' WHERE id = ?", (made[0].id,)
    )
    _, job = await store.create(new_job(24), lambda c: ALLOW)
    assert job is not None
    if db.dialect != "postgresql":
        assert store.placed(job.id) is None
        return
    assert store.placed(job.id) == (1, 3) == await store.busy_and_position(job.id)
    assert store.placed(job.id) is None  # once


async def test_refusal_makes_no_job_and_marks_update(db: Database) -> None:
    """A refused decision is returned and no row is written."""
    store = JobStore(db)
    refused = Decision(False, Reason.RATE)
    decision, job = await store.create(new_job(11), lambda c: refused)
    assert decision is refused and job is None
    assert await store.by_status(JobStatus.QUEUED) == []


async def test_job_and_processed_mark_commit_together(db: Database) -> None:
    """The job row and the inbox 'processed' mark are written in one transaction."""
    inbox, store = Inbox(db), JobStore(db)
    await inbox.save([{"update_id": 12, "message": {}}])
    assert [u.update_id for u in await inbox.unprocessed()] == [12]
    await store.create(new_job(12), lambda c: ALLOW)
    assert await inbox.unprocessed() == []


async def test_claims_are_fifo_and_exclusive(db: Database) -> None:
    """Concurrent claims never hand out the same job, the oldest go first, and no more than
    the cap run; a finished job frees its slot for the next in line."""
    store = JobStore(db)
    for update_id in range(20, 30):
        await store.create(new_job(update_id), lambda c: ALLOW)
    batches = await asyncio.gather(*(store.claim_next(3, TIMEOUTS) for _ in range(4)))
    claimed = [job.id for batch in batches for job in batch]
    assert sorted(claimed) == [1, 2, 3]
    assert all(j.deadline_at and j.owner == "local" for batch in batches for j in batch)
    await store.finish(2, JobStatus.SUCCEEDED)
    assert [j.id for j in await store.claim_next(3, TIMEOUTS)] == [4]
    assert await store.claim_next(3, TIMEOUTS) == []


async def test_final_status_is_written_once(db: Database) -> None:
    """finish() succeeds once; a later finish (e.g. a cancel racing success) is refused."""
    store = JobStore(db)
    _, job = await store.create(new_job(40), lambda c: ALLOW)
    assert job is not None
    assert await store.finish(job.id, JobStatus.SUCCEEDED)
    assert not await store.finish(job.id, JobStatus.CANCELED)
    done = await store.get(job.id)
    assert done is not None and done.status is JobStatus.SUCCEEDED and done.finished_at


async def test_failed_and_canceled_jobs_give_units_back(db: Database) -> None:
    """used_today counts queued, running and succeeded jobs, not failed or canceled ones."""
    store = JobStore(db)
    ids = []
    for update_id in range(50, 54):
        _, job = await store.create(new_job(update_id, user_id=7), lambda c: ALLOW)
        assert job is not None
        ids.append(job.id)
    await store.finish(ids[0], JobStatus.FAILED, error_code="timeout")
    await store.finish(ids[1], JobStatus.CANCELED)
    await store.finish(ids[2], JobStatus.SUCCEEDED)
    counts = await Usage(db).used_today(7, utcnow())
    assert counts[JobKind.GENERATE] == 2
    assert counts[JobKind.EDIT] == 0


async def hold_writer(
    db: Database, priority: int = NORMAL
) -> tuple[asyncio.Task[object], threading.Event]:
    """Occupy the writer (of `priority`'s lane) with one job until the returned event is set
    (bounded: 10 s)."""
    started, release = threading.Event(), threading.Event()

    def hold(conn: object) -> bool:
        started.set()
        return release.wait(10)

    task: asyncio.Task[object] = asyncio.create_task(db.run(hold, priority=priority))
    await wait_until(started.is_set)
    return task, release


async def test_submitted_write_survives_cancellation(db: Database) -> None:
    """A write whose caller is canceled while it waits its turn is still committed."""
    store = JobStore(db)
    _, job = await store.create(new_job(60), lambda c: ALLOW)
    assert job is not None
    blocker, release = await hold_writer(db)
    waiting = asyncio.create_task(store.update(job.id, provider_request_id="pred-1"))
    await asyncio.sleep(0)  # one step of the task: it submits its write, then awaits it
    waiting.cancel()
    release.set()
    await blocker
    await db.run(lambda conn: None)  # the writer runs in order: the canceled write came first
    saved = await store.get(job.id)
    assert saved is not None and saved.provider_request_id == "pred-1"


async def test_group_call_answers_each_caller_and_writes_for_the_canceled(db: Database) -> None:
    """Calls that arrive while the writer is busy go as one group: each caller gets its own
    answer or its own error (also a caller on another event loop, as the webhook thread's),
    and callers canceled meanwhile, the group's submitter among them, still have their rows
    written, while the others' answers are not disturbed."""
    await db.run(lambda conn: conn.execute("CREATE TABLE group_probe (n INTEGER NOT NULL)"))

    def run(conn: Conn, members: list[Member[int, int]]) -> None:
        for member in members:
            if member.arg == 3:
                member.fail(ValueError("three refused"))
                continue
            conn.execute("INSERT INTO group_probe (n) VALUES (?)", (member.arg,))
            member.settle(member.arg * 10)

    group: GroupCall[int, int] = GroupCall(db, run, NORMAL)
    blocker, release = await hold_writer(db)
    calls = {n: asyncio.create_task(group.call(n)) for n in (1, 2, 3, 4)}
    await asyncio.sleep(0)  # each joins: 1 opens the group and submits it
    elsewhere = asyncio.create_task(asyncio.to_thread(asyncio.run, group.call(5)))
    await asyncio.sleep(0.2)  # (the other loop's call joins the same group)
    calls[1].cancel()
    calls[2].cancel()
    release.set()
    await blocker
    assert await calls[4] == 40
    assert await elsewhere == 50
    with pytest.raises(ValueError, match="three refused"):
        await calls[3]
    for n in (1, 2):
        with pytest.raises(asyncio.CancelledError):
            await calls[n]
    assert await group.call(6) == 60  # the next call opens a group of its own
    rows = await db.fetchall("SELECT n FROM group_probe ORDER BY n")
    assert [row["n"] for row in rows] == [1, 2, 4, 5, 6]


async def test_urgent_writes_go_first(db: Database) -> None:
    """An update saved for Telegram's ack jumps ahead of queued job writes."""
    order: list[str] = []
    blocker, release = await hold_writer(db)
    normal = [
        asyncio.create_task(db.run(lambda conn, n=n: order.append(f"job{n}"))) for n in range(3)
    ]
    await asyncio.sleep(0)  # each task submits its work while the writer is held
    urgent = asyncio.create_task(
        db.write(
            lambda conn: order.append("inbox"),
            priority=URGENT,
        )
    )
    await asyncio.sleep(0)
    if db.dialect == "postgresql":  # urgent writes have their own connection there: no wait
        await urgent
    release.set()
    await asyncio.gather(blocker, urgent, *normal)
    assert order == ["inbox", "job0", "job1", "job2"]


# -- contract: what both backends must do the same way ----------------------------------------


def test_migrations_are_numbered_in_lockstep() -> None:
    """migrations/sqlite and migrations/postgresql hold the same numbers and names."""
    sqlite_names = [m.name for m in load_migrations(dialect="sqlite")]
    pg_names = [m.name for m in load_migrations(dialect="postgresql")]
    assert sqlite_names == pg_names


async def test_two_processes_starting_together_migrate_once(target: str) -> None:
    """Two stores migrating one empty database at the same moment apply each migration once
    and both start."""
    first, second = Database(target), Database(target)
    await first.open()
    await second.open()
    try:
        applied = await asyncio.gather(migrate(first), migrate(second))
        rows = await first.fetchall("SELECT name FROM schema_migrations ORDER BY name")
    finally:
        await first.close()
        await second.close()
    names = [m.name for m in load_migrations(dialect=first.dialect)]
    assert sorted(applied[0] + applied[1]) == names
    assert [row["name"] for row in rows] == names


async def test_database_newer_than_the_code_is_refused(db: Database) -> None:
    """A database holding a migration this code does not know stops start-up, named."""
    await db.execute_write(
        "INSERT INTO schema_migrations (name, applied_at) VALUES (?, ?)",
        ("9999_from_the_future", iso()),
    )
    with pytest.raises(StoreError, match="newer imagebot"):
        await migrate(db)


@pytest.mark.parametrize("with_spend", [True, False], ids=["spend-cap", "no-spend-cap"])
async def test_concurrent_requests_of_one_user_never_pass_the_cap(
    target: str, with_spend: bool
) -> None:
    """Sixty requests of one user at once, through two stores on one database (as two
    processes would), make exactly the daily cap of jobs; the rest are refused. Without a
    spend cap only the user's own lock guards the count."""
    cap = 5
    stores = [Database(target), Database(target)]
    for store_db in stores:
        await store_db.open()
    await migrate(stores[0])
    try:

        def decide(counters: Counters) -> Decision:
            # Widen the window between reading the counters and inserting: without the
            # create lock, two stores would both see room for one more job here.
            time.sleep(0.002)
            return ALLOW if counters.used_today < cap else Decision(False, Reason.CAP)

        results = await asyncio.gather(
            *(
                JobStore(stores[n % 2]).create(
                    new_job(1000 + n, user_id=42), decide, with_spend=with_spend
                )
                for n in range(60)
            )
        )
        count = await stores[0].fetchone("SELECT count(*) AS n FROM jobs WHERE user_id = 42")
    finally:
        for store_db in stores:
            await store_db.close()
    made = [job for _, job in results if job is not None]
    refused = [d for d, job in results if job is None and d is not None and not d.allowed]
    assert len(made) == cap
    assert len(refused) == 60 - cap
    assert count is not None and count["n"] == cap


async def test_credits_are_never_overspent_under_concurrency(target: str) -> None:
    """A user with credits for three jobs asks for twenty at once through two stores: three
    jobs are made, the balance ends at zero, never below."""
    stores = [Database(target), Database(target)]
    for store_db in stores:
        await store_db.open()
    await migrate(stores[0])
    try:
        await Ledger(stores[0]).grant(77, 3, "test")

        def reserve(conn: Conn, job_id: int, decision: Decision) -> None:
            time.sleep(0.002)  # a wider race window, as in the cap test above
            reserve_in(conn, 77, job_id, 1)

        async def ask(n: int) -> Job | None:
            try:
                # no spend cap: only the user's own lock guards the balance
                _, job = await JobStore(stores[n % 2]).create(
                    new_job(2000 + n, user_id=77),
                    lambda c: ALLOW,
                    after_insert=reserve,
                    with_spend=False,
                )
            except NotEnoughCredits:
                return None
            return job

        made = [job for job in await asyncio.gather(*(ask(n) for n in range(20))) if job]
        balance = await Ledger(stores[1]).balance(77)
        jobs = await stores[1].fetchall("SELECT id FROM jobs WHERE user_id = 77")
    finally:
        for store_db in stores:
            await store_db.close()
    assert len(made) == 3 and len(jobs) == 3
    assert balance == 0


async def test_claims_across_two_stores_never_share_a_job(target: str) -> None:
    """Two stores claiming from one queue at once never both take a job (SKIP LOCKED on
    PostgreSQL, the single writer lock on SQLite)."""
    stores = [Database(target), Database(target)]
    for store_db in stores:
        await store_db.open()
    await migrate(stores[0])
    try:
        for update_id in range(3000, 3030):
            await JobStore(stores[0]).create(new_job(update_id), lambda c: ALLOW)
        batches = await asyncio.gather(
            *(JobStore(stores[n % 2], f"node-{n}").claim_next(30, TIMEOUTS) for n in range(10))
        )
    finally:
        for store_db in stores:
            await store_db.close()
    claimed = [job.id for batch in batches for job in batch]
    assert len(claimed) == len(set(claimed)) == 30


async def test_request_id_is_committed_before_the_call_returns(db: Database, target: str) -> None:
    """Once update() returns, another connection (another process) reads the vendor's id."""
    store = JobStore(db)
    _, job = await store.create(new_job(70), lambda c: ALLOW)
    assert job is not None
    assert await store.update(job.id, phase=Phase.SUBMITTED, provider_request_id="pred-70")
    (row,) = query(target, "SELECT phase, provider_request_id FROM jobs WHERE id = ?", (job.id,))
    assert (row["phase"], row["provider_request_id"]) == ("submitted", "pred-70")


async def test_rows_round_trip_timestamps_and_json(db: Database) -> None:
    """Timestamps come back as ISO-8601 UTC text ending in Z and JSON columns as the lists
    and objects written, on both backends."""
    store = JobStore(db)
    new = new_job(80)
    new = NewJob(**{**{f: getattr(new, f) for f in new.__dataclass_fields__}, "params": {"a": 1}})
    _, job = await store.create(new, lambda c: ALLOW)
    assert job is not None
    await store.update(job.id, output_urls=["http://x/1.png"], delivered_message_ids=[5, 6])
    saved = await store.get(job.id)
    assert saved is not None
    assert saved.params == {"a": 1}
    assert saved.output_urls == ["http://x/1.png"] and saved.delivered_message_ids == [5, 6]
    assert saved.created_at.endswith("Z") and parse_iso(saved.created_at) <= utcnow()
    found = await store.find(JobFilter(since=iso(utcnow() - timedelta(minutes=1))))
    assert [j.id for j in found] == [job.id]


async def test_retention_prunes_old_inbox_rows_and_final_jobs(db: Database) -> None:
    """Processed updates and final jobs older than the retention go; fresh and open ones stay."""
    inbox, store = Inbox(db), JobStore(db)
    await inbox.save([{"update_id": 90, "message": {}}, {"update_id": 91, "message": {}}])
    await inbox.mark_processed(90)
    old = iso(utcnow() - timedelta(days=40))
    await db.execute_write("UPDATE inbox SET received_at = ? WHERE update_id = 90", (old,))
    _, done = await store.create(new_job(92), lambda c: ALLOW)
    _, open_job = await store.create(new_job(93), lambda c: ALLOW)
    assert done is not None and open_job is not None
    await store.finish(done.id, JobStatus.SUCCEEDED)
    await db.execute_write("UPDATE jobs SET finished_at = ? WHERE id = ?", (old, done.id))
    assert await inbox.prune(8) == 1
    assert [j.id for j in await store.prune(30)] == [done.id]
    assert [u.update_id for u in await inbox.unprocessed()] == [91]
    assert (await store.get(open_job.id)) is not None
    assert await inbox.counts() == {"total": 1, "pending": 1}


async def test_duplicate_updates_are_saved_once(db: Database) -> None:
    """An update Telegram sends twice is new the first time only."""
    inbox = Inbox(db)
    assert await inbox.save([{"update_id": 100, "message": {}}]) == [True]
    assert await inbox.save([{"update_id": 100, "message": {}}, {"update_id": 101}]) == [
        False,
        True,
    ]


async def test_saves_waiting_together_are_each_committed_and_told_their_own(
    db: Database,
) -> None:
    """Saves that queue up while the writer is busy (from the main loop and from a second
    thread's loop, as the webhook's) are all committed, and each caller learns which of its
    updates are new, even when two of them carry the same update while it waits."""
    inbox = Inbox(db)
    assert await inbox.save([{"update_id": 1, "message": {}}]) == [True]
    blocker, release = await hold_writer(db, URGENT)
    here = [
        asyncio.create_task(inbox.save([{"update_id": n, "message": {"n": n}}]))
        for n in range(1, 31)
    ]
    here.append(asyncio.create_task(inbox.save([{"update_id": 20, "message": {}}])))
    batch = [{"update_id": n, "message": {}} for n in range(31, 36)]
    here.append(asyncio.create_task(inbox.save(batch)))
    elsewhere: list[list[bool]] = []
    failed: list[BaseException] = []

    def webhook_thread() -> None:
        async def saves() -> None:
            results = await asyncio.gather(
                *(inbox.save([{"update_id": n, "message": {}}]) for n in range(25, 45))
            )
            elsewhere.extend(results)

        try:
            asyncio.run(saves())
        except BaseException as exc:  # reported to the test below
            failed.append(exc)

    thread = threading.Thread(target=webhook_thread)
    thread.start()
    await asyncio.sleep(0.2)  # every save is queued behind the held writer by now
    release.set()
    await blocker
    results = await asyncio.gather(*here)
    await asyncio.to_thread(thread.join, 10)
    assert not failed and len(elsewhere) == 20
    told_new: dict[int, int] = {}
    for ids, result in (
        *((range(n, n + 1), results[n - 1]) for n in range(1, 31)),
        (range(20, 21), results[30]),
        (range(31, 36), results[31]),
        *((range(n, n + 1), elsewhere[n - 25]) for n in range(25, 45)),
    ):
        assert len(result) == len(ids)
        for update_id, is_new in zip(ids, result, strict=True):
            told_new[update_id] = told_new.get(update_id, 0) + int(is_new)
    assert told_new == {n: 0 if n == 1 else 1 for n in range(1, 45)}
    rows = await db.fetchall("SELECT update_id, payload FROM inbox ORDER BY update_id")
    assert [row["update_id"] for row in rows] == list(range(1, 45))
    assert await inbox.counts() == {"total": 44, "pending": 44}


async def test_an_update_the_database_refuses_fails_only_its_own_save(db: Database) -> None:
    """A body PostgreSQL cannot store (a NUL character in its text) fails its own save only;
    the saves committed together with it are stored and told so."""
    if db.dialect != "postgresql":
        pytest.skip("SQLite stores any text")
    from psycopg.errors import UntranslatableCharacter

    inbox = Inbox(db)
    blocker, release = await hold_writer(db, URGENT)
    good = [asyncio.create_task(inbox.save([{"update_id": n, "message": {}}])) for n in (1, 2, 3)]
    bad = asyncio.create_task(inbox.save([{"update_id": 4, "message": {"text": "a\x00b"}}]))
    more = asyncio.create_task(inbox.save([{"update_id": 5, "message": {}}]))
    await asyncio.sleep(0.1)
    release.set()
    await blocker
    assert await asyncio.gather(*good, more) == [[True], [True], [True], [True]]
    with pytest.raises(UntranslatableCharacter):
        await bad
    rows = await db.fetchall("SELECT update_id FROM inbox ORDER BY update_id")
    assert [row["update_id"] for row in rows] == [1, 2, 3, 5]
    assert db.writes.ok or await db.probe_write()  # not a storage fault: writes go on


async def test_a_save_on_a_closed_store_fails_instead_of_waiting(db: Database) -> None:
    """Saving after the store closed raises at once (the webhook answers 500 and Telegram
    sends the update again) instead of waiting forever for a writer that is gone."""
    inbox = Inbox(db)
    await db.close()
    with pytest.raises(StoreError):
        await asyncio.wait_for(inbox.save([{"update_id": 1, "message": {}}]), 10)


async def test_write_probe_and_health(db: Database) -> None:
    """The write probe succeeds and the store reports itself healthy."""
    assert await db.probe_write()
    assert await db.is_healthy()
    assert db.writes.ok


# -- several processes on one database (issue 16) ---------------------------------------------


async def open_stores(target: str, count: int) -> list[Database]:
    """`count` Database objects on one store (as `count` processes would have)."""
    stores = [Database(target) for _ in range(count)]
    for store_db in stores:
        await store_db.open()
    await migrate(stores[0])
    return stores


async def test_racing_claimers_never_pass_the_cap(target: str) -> None:
    """Twelve claims from three stores (three processes) racing for a cap of 2 hand out
    exactly jobs 1 and 2; after one ends, a second race hands out exactly job 3."""
    stores = await open_stores(target, 3)
    try:
        for update_id in range(4000, 4020):
            await JobStore(stores[0]).create(new_job(update_id), lambda c: ALLOW)
        claimers = [JobStore(stores[n % 3], f"node-{n % 3}") for n in range(12)]
        batches = await asyncio.gather(*(c.claim_next(2, TIMEOUTS) for c in claimers))
        assert sorted(j.id for b in batches for j in b) == [1, 2]
        await claimers[0].finish(1, JobStatus.SUCCEEDED)
        batches = await asyncio.gather(*(c.claim_next(2, TIMEOUTS) for c in claimers))
        assert [j.id for b in batches for j in b] == [3]
        (row,) = query(target, "SELECT count(*) AS n FROM jobs WHERE status = 'running'", ())
        assert row["n"] == 2
    finally:
        for store_db in stores:
            await store_db.close()


async def test_claim_churn_never_passes_the_cap(target: str) -> None:
    """Three claimers each claim, run for a moment and finish, concurrently, 30 jobs under a
    cap of 4: a watcher sampling the store never sees more than 4 running, and every job
    ends exactly once."""
    stores = await open_stores(target, 4)
    cap, seen, done = 4, [0], asyncio.Event()
    try:
        for update_id in range(5000, 5030):
            await JobStore(stores[0]).create(new_job(update_id), lambda c: ALLOW)

        async def worker(n: int) -> list[int]:
            store, mine, ran = JobStore(stores[n], f"node-{n}"), [], []
            for _ in range(400):  # bounded
                mine.extend(await store.claim_next(cap, TIMEOUTS))
                if not mine:
                    if not await store.by_status(JobStatus.QUEUED):
                        return ran
                    await asyncio.sleep(0.005)
                    continue
                await asyncio.sleep(0.01)
                job = mine.pop(0)
                assert await store.finish(job.id, JobStatus.SUCCEEDED, fence=job)
                ran.append(job.id)
            return ran

        async def watch() -> None:
            store = JobStore(stores[3])
            while not done.is_set():
                seen[0] = max(seen[0], await store.slots_busy())
                await asyncio.sleep(0.002)

        watcher = asyncio.create_task(watch())
        ran = await asyncio.gather(*(worker(n) for n in range(3)))
        done.set()
        await watcher
    finally:
        for store_db in stores:
            await store_db.close()
    ids = [job_id for part in ran for job_id in part]
    assert sorted(ids) == list(range(1, 31))
    assert 0 < seen[0] <= cap


async def test_ownerless_running_jobs_are_adopted_before_the_queue(target: str) -> None:
    """A running job whose process died (owner cleared, token moved on) is taken by the next
    claim before any queued job, with a new owner and token; it still counted toward the cap,
    so no queued job starts while the cap is full."""
    stores = await open_stores(target, 2)
    try:
        a, b = JobStore(stores[0], "node-a"), JobStore(stores[1], "node-b")
        for update_id in range(6000, 6004):
            await a.create(new_job(update_id), lambda c: ALLOW)
        first, second = await a.claim_next(2, TIMEOUTS)
        await a.update(second.id, fence=second, phase=Phase.SUBMITTED, provider_request_id="p2")
        await stores[0].execute_write(  # what the cluster's reap does to a dead node's jobs
            "UPDATE jobs SET owner = NULL, lease_token = lease_token + 1, rescues = rescues + 1"
            " WHERE id = ?",
            (second.id,),
        )
        claimed = await b.claim_next(2, TIMEOUTS)
        assert [j.id for j in claimed] == [second.id] and claimed.adopted == {second.id}
        (adopted,) = claimed
        assert (adopted.owner, adopted.lease_token, adopted.rescues) == ("node-b", 3, 1)
        assert adopted.phase is Phase.SUBMITTED and adopted.provider_request_id == "p2"
        assert adopted.deadline_at == second.deadline_at  # at the vendor: its deadline holds
        await a.finish(first.id, JobStatus.SUCCEEDED, fence=first)
        assert [j.id for j in await b.claim_next(2, TIMEOUTS)] == [3]
    finally:
        for store_db in stores:
            await store_db.close()


async def test_fair_share_spreads_claims_over_live_workers(target: str) -> None:
    """With two live worker processes and a cap of 4, one claim takes only its share (2) and
    leaves the rest for the other process."""
    stores = await open_stores(target, 2)
    try:
        nodes = ClusterStore(stores[0])
        for node in ("node-a", "node-b"):
            await nodes.register(node, host="h", pid=1, roles=["worker"], ops_port=None)
        await nodes.register("node-i", host="h", pid=2, roles=["intake"], ops_port=None)
        a, b = JobStore(stores[0], "node-a"), JobStore(stores[1], "node-b")
        for update_id in range(7000, 7006):
            await a.create(new_job(update_id), lambda c: ALLOW)
        assert [j.id for j in await a.claim_next(4, TIMEOUTS)] == [1, 2]
        assert await a.claim_next(4, TIMEOUTS) == []
        assert [j.id for j in await b.claim_next(4, TIMEOUTS)] == [3, 4]
    finally:
        for store_db in stores:
            await store_db.close()


async def test_fenced_writes_are_refused_once_the_job_moved_on(db: Database) -> None:
    """A runner's writes carry owner + lease token: after the job is taken over (token bump)
    or canceled elsewhere (the final write bumps it too), they change nothing."""
    a, b = JobStore(db, "node-a"), JobStore(db, "node-b")
    for update_id in (8000, 8001):
        await a.create(new_job(update_id), lambda c: ALLOW)
    first, second = await a.claim_next(2, TIMEOUTS)
    assert first.lease_token == 1
    assert await a.update(first.id, expect=[JobStatus.RUNNING], fence=first, attempts=1)
    await db.execute_write(
        "UPDATE jobs SET owner = NULL, lease_token = lease_token + 1 WHERE id = ?", (first.id,)
    )
    assert not await a.update(first.id, fence=first, attempts=5, provider_request_id="late")
    assert not await a.finish(first.id, JobStatus.SUCCEEDED, fence=first)
    assert not await a.owns(first) and await a.not_owned([first, second]) == [first.id]
    (adopted,) = await b.claim_next(2, TIMEOUTS)
    assert adopted.id == first.id and await b.owns(adopted)
    row = await b.get(first.id)
    assert row is not None and (row.attempts, row.provider_request_id) == (1, None)
    # a cancel by another process: unfenced, and the owner's writes stop landing
    assert await b.finish(second.id, JobStatus.CANCELED, error_code="canceled")
    assert not await a.update(second.id, fence=second, attempts=2)
    assert await a.not_owned([second]) == [second.id]


async def test_an_ending_from_outside_leaves_a_job_whose_images_are_made(db: Database) -> None:
    """A cancel or sweep from another process (unfenced) is refused once the job's images are
    made (its runner may be sending them), so the chat never gets the result and "Canceled"."""
    store = JobStore(db, "node-a")
    await store.create(new_job(8100), lambda c: ALLOW)
    (job,) = await store.claim_next(1, TIMEOUTS)
    assert await store.update(job.id, fence=job, phase=Phase.DELIVERING)
    outside = (Phase.FETCHED, Phase.DELIVERING)
    assert not await store.finish(
        job.id, JobStatus.CANCELED, error_code="canceled", not_phases=outside
    )
    row = await store.get(job.id)
    assert row is not None and (row.status, row.phase) == (JobStatus.RUNNING, Phase.DELIVERING)
    assert await store.update(job.id, fence=job, phase=Phase.SUBMITTED)
    assert await store.finish(
        job.id, JobStatus.CANCELED, error_code="canceled", not_phases=outside
    )


async def test_hand_back_and_deliveries_due_respect_owners(db: Database, target: str) -> None:
    """A clean stop hands a node's running jobs back (ownerless, token +1) and releases its
    held jobs; `deliveries_due` adopts ownerless made results but leaves another live
    process's own."""
    a, b = JobStore(db, "node-a"), JobStore(db, "node-b")
    for update_id in (9000, 9001, 9002):
        await a.create(new_job(update_id), lambda c: ALLOW)
    held = await a.create(new_job(9003), lambda c: ALLOW, hold_s=600)
    assert held[1] is not None and held[1].owner == "node-a"
    one, two = await a.claim_next(2, TIMEOUTS)
    (three,) = await b.claim_next(3, TIMEOUTS)
    for job, store in ((one, a), (two, a), (three, b)):
        assert await store.update(job.id, fence=job, phase=Phase.FETCHED)
    assert await a.hand_back() == [one.id, two.id]
    rows = {j.id: j for j in await a.by_status(JobStatus.RUNNING, JobStatus.QUEUED)}
    assert rows[one.id].owner is None and rows[one.id].lease_token == one.lease_token + 1
    assert rows[held[1].id].owner is None
    (row,) = query(target, "SELECT held_until FROM jobs WHERE id = ?", (held[1].id,))
    assert row["held_until"] is None
    due = await b.deliveries_due(utcnow())
    assert [j.id for j in due] == [one.id, two.id, three.id]
    assert due.adopted == {one.id, two.id} and all(j.owner == "node-b" for j in due)
    assert list(await a.deliveries_due(utcnow())) == []
