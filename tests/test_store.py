"""JobStore against a real SQLite file: dedupe, claim, finish, and the quota it implies."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from imagebot.clock import utcnow
from imagebot.models import JobKind, JobStatus, NewJob
from imagebot.policy import ALLOW, Decision, Reason
from imagebot.store.db import URGENT, Database
from imagebot.store.inbox import Inbox
from imagebot.store.jobs import JobStore
from imagebot.store.migrate import migrate
from imagebot.store.usage import Usage

TIMEOUTS = {JobKind.GENERATE: 90.0, JobKind.EDIT: 30.0}


@pytest.fixture
async def db(tmp_path: Path) -> AsyncIterator[Database]:
    database = Database(tmp_path / "store.db")
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
    """Concurrent claims never hand out the same job, and the oldest goes first."""
    store = JobStore(db)
    for update_id in range(20, 30):
        await store.create(new_job(update_id), lambda c: ALLOW)
    batches = await asyncio.gather(*(store.claim_next(3, TIMEOUTS) for _ in range(4)))
    claimed = [job.id for batch in batches for job in batch]
    assert sorted(claimed) == list(range(1, 11))
    assert len(claimed) == len(set(claimed))
    assert [j.id for j in batches[0]] == [1, 2, 3]
    assert all(j.deadline_at for batch in batches for j in batch)


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


async def test_submitted_write_survives_cancellation(db: Database) -> None:
    """A write whose caller is canceled while it waits its turn is still committed."""
    store = JobStore(db)
    _, job = await store.create(new_job(60), lambda c: ALLOW)
    assert job is not None
    blocker = asyncio.create_task(db.run(lambda conn: time.sleep(0.2)))
    await asyncio.sleep(0.05)
    waiting = asyncio.create_task(store.update(job.id, provider_request_id="pred-1"))
    await asyncio.sleep(0.05)
    waiting.cancel()
    await blocker
    await asyncio.sleep(0.05)
    saved = await store.get(job.id)
    assert saved is not None and saved.provider_request_id == "pred-1"


async def test_urgent_writes_go_first(db: Database) -> None:
    """An update saved for Telegram's ack jumps ahead of queued job writes."""
    order: list[str] = []
    blocker = asyncio.create_task(db.run(lambda conn: time.sleep(0.1)))
    await asyncio.sleep(0.02)
    normal = [
        asyncio.create_task(db.run(lambda conn, n=n: order.append(f"job{n}"))) for n in range(3)
    ]
    await asyncio.sleep(0.01)
    urgent = asyncio.create_task(
        db.write(
            lambda conn: order.append("inbox"),
            priority=URGENT,
        )
    )
    await asyncio.gather(blocker, urgent, *normal)
    assert order == ["inbox", "job0", "job1", "job2"]
